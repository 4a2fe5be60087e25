"""Fixtures of every test. Tests are laid out by kind: unit/ (one process, no DeepSpeed
engine), integration/ (runs through DeepSpeed, several processes, SLURM, end to end) and
support/ (helpers and the scripts the integration tests start)."""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "support"))  # `from helpers import ...` in every test
if not torch.cuda.is_available():  # Triton kernels (attention_backend=fused) run in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")  # set before any kernel is defined

from vilbert import ViLBERTConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def toy_world(tmp_path_factory):
    """A small toy world (600 training, 100 held-out images, 32-d features)."""
    from shards.toyworld import write_toyworld

    out = tmp_path_factory.mktemp("toy")
    write_toyworld(out, 600, 100, feature_dim=32)
    return out


@pytest.fixture
def tiny_config():
    return ViLBERTConfig.from_preset("tiny")


@pytest.fixture
def corrupt_shards(tmp_path):
    """A shard set with one of each problem: NaN features, an empty caption, an undecodable
    sample, and a second shard cut off in the middle of a sample."""
    import numpy as np

    from helpers import write_sample_shards
    from shards.writer import TarShard
    from vilbert.data.sample_codec import decode_sample, encode_sample
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_shard
    directory = write_sample_shards(tmp_path / "corrupt", n_shards=2, per_shard=40)
    good = {key: data for key, data, _ in read_shard(directory / "shard-000000.tar")}
    first = decode_sample(next(iter(good.values())))
    arrays = {k: first[k] for k in ("features", "boxes", "cls_index", "cls_prob")}
    nan = {**arrays, "features": np.full_like(arrays["features"], np.nan)}
    shard = TarShard(directory / "shard-000000.tar")
    for key, data in good.items():
        shard.write(key, bytes(data))
    shard.write("bad-nan", encode_sample("bad-nan", "bad-nan", ["a caption"], 100, 80, nan))
    shard.write("bad-caption", encode_sample("bad-caption", "bad-caption", [" "], 100, 80, arrays))
    shard.write("bad-bytes", b"VLB1\xff\xff\x00\x00garbage")
    shard.close()
    second = directory / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[: second.stat().st_size // 2 + 100])
    index = ShardIndex.read(directory)
    index.shards[0].samples += 3
    index.write(directory)
    return directory
