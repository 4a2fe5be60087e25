"""Decode and verify every sample of a shard set and report every problem found."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vilbert.data.pipeline import resolve_shards
from vilbert.data.tar_reader import UNREADABLE, read_checked_samples


@dataclass
class Problem:
    shard: str
    key: str
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}: {self.key}: {self.reason}"


def check_shards(spec: str) -> tuple[int, list[Problem]]:
    """(good samples, problems) for a shard-set directory or URL pattern: every bad sample
    (checksums always verified), damage that stops a shard's reading (with what was found
    before it), and shards holding fewer or more samples than the index says."""
    try:
        urls, index = resolve_shards(spec)
    except (OSError, ValueError) as e:
        return 0, [Problem(spec, "-", f"cannot read the shard set: {e}")]
    if not urls:
        return 0, [Problem(spec, "-", "the shard set holds no shards (training refuses it)")]
    feature_dim, num_classes = (index.feature_dim, index.num_classes) if index else (None, None)
    expected = {s.name: s.samples for s in index.shards} if index else {}
    good, problems = 0, []
    for url in tqdm(urls, desc="checking shards", unit="shard"):
        members = 0
        for key, sample, problem in read_checked_samples(url, feature_dim, num_classes, verify=True):
            if problem is not None:
                problems.append(Problem(url, key, problem))
            good += sample is not None
            members += problem is None or not problem.startswith(UNREADABLE)
        wanted = expected.get(Path(url).name)
        if wanted is not None and wanted != members:
            lost = f" ({wanted - members} lost)" if wanted > members else ""
            problems.append(Problem(url, "-", f"index says {wanted} samples, shard has {members}{lost}"))
    return good, problems


def objectives(spec: str) -> str:
    """What a shard set can train, from its index, in words ('' without an index)."""
    try:
        _, index = resolve_shards(spec)
    except (OSError, ValueError):
        return ""
    if index is None:
        return ""
    if index.task:
        return f"task set: {index.task.get('name', '?')} ({index.task.get('examples', '?')} examples)"
    regions = (f"masked regions with the paper's KL to the detector's {index.num_classes} classes (cls_prob)"
               if index.num_classes else "masked regions by feature regression only (no cls_prob: pretrain with "
               f"model.overrides.visual_target=1 model.overrides.v_target_size={index.feature_dim})")
    return f"pretraining set: masked text, image-caption alignment, {regions}"
