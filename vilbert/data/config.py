"""The `data:` section: which shards a run streams and how (read by `vilbert.data.pipeline`).
Kept apart from the pipeline so that reading a config needs neither torch nor transformers."""

from __future__ import annotations

from dataclasses import dataclass

from vilbert.config_schema import checked, non_negative, positive, unit


@dataclass
class DataConfig:
    shards: str = ""  # shard-set directory/index.json, or URLs: paths, globs, {000..009} braces, pipe:CMD
    index: str = ""  # with URLs: the shard set's index.json (a local copy: feature width, classes, regions)
    fraction: float = checked(1.0, lambda v: 0 < v <= 1, "in (0, 1]")  # of the shard set's samples (whole shards,
    # seeded; needs an index)
    fraction_seed: int = 0
    batch_size: int = positive(32)  # per rank (the micro batch)
    workers: int = non_negative(2)
    shuffle_buffer: int = positive(1000)
    negative_probability: float = unit(0.5)  # alignment negatives: caption of another image
    negative_buffer: int = positive(512)
    max_bad_fraction: float = unit(0.01)  # stop when more of a worker's last 10,000 samples are bad or lost
    verify_checksums: bool = True  # each sample's CRC-32 (`shards check` always verifies)
    tokenizer: str | None = None  # vocab.txt or tokenizer directory (default: bert-base-uncased vocab)
    seed: int = 0
