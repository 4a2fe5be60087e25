"""Hard negatives for retrieval training: each image's nearest neighbours among the shard set's
images, by cosine similarity of their mean region features, computed once and cached beside
the shards (`vilbert.tasks.retrieval.HARD_NEGATIVES`), where the retrieval task reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vilbert.data.shard_index import ShardIndex
from vilbert.data.tar_reader import read_checked_samples
from vilbert.tasks.retrieval import HARD_NEGATIVES

NEIGHBOURS = 100  # per image, as the official code's hard-negative pool
BLOCK = 4096  # images whose similarities to all others are computed at once


def mean_features(shards: str | Path) -> tuple[list[str], np.ndarray]:
    """The keys of a shard set's samples and their mean region features [N, F] (float32)."""
    index, keys, means = ShardIndex.read(shards), [], []
    for shard in tqdm(index.shards, desc="mean region features", unit="shard"):
        for key, sample, problem in read_checked_samples(str(Path(shards) / shard.name), index.feature_dim):
            if problem is not None:
                raise ValueError(f"{shard.name}: {key}: {problem} (`python -m shards check {shards}`)")
            keys.append(key)
            means.append(sample["features"].astype(np.float32).mean(0))
    return keys, np.stack(means)


def nearest_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """[N, min(k, N - 1)] row numbers of each row's most cosine-similar other rows, nearest first."""
    k = min(k, len(vectors) - 1)
    if k < 1:
        raise ValueError("hard negatives need at least 2 images")
    unit = torch.nn.functional.normalize(torch.from_numpy(vectors), dim=1)
    out = np.empty((len(vectors), k), np.int32)
    for start in range(0, len(unit), BLOCK):
        similarity = unit[start:start + BLOCK] @ unit.T
        rows = torch.arange(start, start + len(similarity))
        similarity[torch.arange(len(similarity)), rows] = -float("inf")  # never itself
        out[start:start + len(similarity)] = similarity.topk(k, dim=1).indices.numpy()
    return out


def write_hard_negatives(shards: str | Path, k: int = NEIGHBOURS) -> Path:
    """Compute a shard set's hard negatives and write them beside its shards; returns the file."""
    keys, means = mean_features(shards)
    path = Path(shards) / HARD_NEGATIVES
    temporary = path.with_suffix(".partial.npz")
    np.savez(temporary, keys=np.array(keys), neighbours=nearest_neighbours(means, k))
    temporary.replace(path)
    return path
