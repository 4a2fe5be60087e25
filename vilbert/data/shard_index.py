"""The index of a shard set: `index.json` beside its shards.

It holds the shard names and sample counts, feature dim, class count, top-k, the source,
and for a task's shard set the task's own metadata (`task`: its name, example count, e.g.
VQA's answer vocabulary). `select_fraction` picks a reproducible subset of shards for the
pretraining data-size ablation (a smaller fraction is always a subset of a larger one).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

INDEX_NAME = "index.json"
INDEX_FORMAT = "vilbert-shards/1"


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int = 0


@dataclass
class ShardIndex:
    shards: list[ShardInfo]
    feature_dim: int
    num_classes: int
    class_topk: int
    feature_dtype: str = "float16"
    max_regions: int = 36
    source: str = ""
    class_names: list[str] = field(default_factory=list)
    task: dict = field(default_factory=dict)  # task shard sets: name, examples, and e.g. VQA's answer vocabulary
    format: str = INDEX_FORMAT

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def write(self, directory: str | Path) -> Path:
        path = Path(directory) / INDEX_NAME
        fields = asdict(self)
        fields["num_samples"] = self.num_samples
        path.write_text(json.dumps(fields, indent=1))
        return path

    @classmethod
    def read(cls, path: str | Path) -> ShardIndex:
        path = Path(path)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path.parent} has no {INDEX_NAME}: not a shard set (`python -m shards write` "
                                    "makes them), or a write that did not finish")
        try:
            fields = json.loads(path.read_text())
            if not isinstance(fields, dict) or fields.get("format") != INDEX_FORMAT:
                raise ValueError(f"not a {INDEX_FORMAT} index")
            fields.pop("num_samples", None)
            fields["shards"] = [ShardInfo(**s) for s in fields["shards"]]
            index = cls(**fields)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: unreadable shard index ({type(e).__name__}: {e})") from None
        for shard in index.shards:
            if not isinstance(shard.name, str) or "/" in shard.name or type(shard.samples) is not int \
                    or shard.samples < 0:
                raise ValueError(f"{path}: bad shard entry {asdict(shard)}")
        for name in ("feature_dim", "num_classes", "class_topk", "max_regions"):
            if type(getattr(index, name)) is not int or getattr(index, name) < 0:
                raise ValueError(f"{path}: {name} must be a non-negative integer, not {getattr(index, name)!r}")
        return index

    def select_fraction(self, fraction: float, seed: int = 0) -> list[ShardInfo]:
        """Whole shards, in a seeded order, until `fraction` of the samples is covered.
        The order does not depend on `fraction`, so 25% is a subset of 50%."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        order = list(self.shards)
        random.Random(seed).shuffle(order)
        chosen, covered = [], 0
        for shard in order:
            if covered >= fraction * self.num_samples:
                break
            chosen.append(shard)
            covered += shard.samples
        return chosen
