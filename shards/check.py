"""Decode every sample of a shard set and report the bad ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vilbert.data.format import UNREADABLE, read_checked_samples
from vilbert.data.pipeline import resolve_shards


@dataclass
class Problem:
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key}: {self.reason}"


def check_shards(spec: str) -> tuple[int, list[Problem]]:
    """(samples read, problems) for a shard-set directory or URL pattern. Also reports
    shards whose sample count differs from the index."""
    urls, index = resolve_shards(spec)
    feature_dim = index.feature_dim if index else None
    expected = {s.name: s.samples for s in index.shards} if index else {}
    seen, problems = 0, []
    for url in tqdm(urls, desc="checking shards", unit="shard"):
        count = 0
        for key, _, problem in read_checked_samples(url, feature_dim):
            if problem is not None:
                problems.append(Problem(url, key, problem))
            count += problem is None or not problem.startswith(UNREADABLE)
        seen += count
        name = Path(url).name
        if name in expected and expected[name] != count:
            problems.append(Problem(url, "-", f"index says {expected[name]} samples, shard has {count}"))
    return seen, problems
