"""Decode every sample of a shard set and report the bad ones."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vilbert.data.format import BadSample, decode_sample, read_shard, validate_sample
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
        key, count = "(start of shard)", 0
        try:
            for key, data in read_shard(url):
                count += 1
                try:
                    validate_sample(decode_sample(data), feature_dim)
                except BadSample as e:
                    problems.append(Problem(url, key, str(e)))
        except (tarfile.TarError, OSError, EOFError) as e:
            problems.append(Problem(url, f"after {key}", f"unreadable shard ({type(e).__name__}: {e})"))
        seen += count
        name = Path(url).name
        if name in expected and expected[name] != count:
            problems.append(Problem(url, "-", f"index says {expected[name]} samples, shard has {count}"))
    return seen, problems
