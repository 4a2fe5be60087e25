"""The training configuration: one YAML file, overridable by dotted keys on the command line.
Each section's dataclass lives beside the component that reads it (and declares its ranges
on its fields, `vilbert.config_schema`); this module composes them. No torch is imported.

    model:       which model, its size, where its weights start (vilbert/model_factory.py)
    task:        fine-tuning only: the task's name and its own keys (vilbert/tasks/<name>.py)
    data:        the shard set and how it streams (vilbert/data/config.py)
    eval:        held-out shards, how often, the toy-world probes (vilbert/train/objective.py)
    optim:       AdamW, the paper's schedule, batch sizes, steps (vilbert/train/optim.py)
    deepspeed:   path to a file in deepspeed_configs/ (ZeRO stage x precision)
    checkpoint:  where, how often, how many to keep (vilbert/train/checkpoint.py)
    tracking:    MLflow experiment, run name, URI (vilbert/train/tracking.py)
    distributed: collective timeout, heartbeat (vilbert/train/distributed.py)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vilbert.config_schema import ConfigError, build_section
from vilbert.data.config import DataConfig
from vilbert.model_factory import ModelConfig, check_model_config
from vilbert.train.checkpoint import CheckpointConfig
from vilbert.train.distributed import DistributedConfig
from vilbert.train.objective import EvalConfig
from vilbert.train.optim import OptimConfig
from vilbert.train.tracking import TrackingConfig


@dataclass
class TrainConfig:
    output_dir: str = "runs/pretrain"
    seed: int = 0
    deepspeed: str = "deepspeed_configs/zero2_bf16.json"
    bf16_fallback: bool = True  # a bf16 file on hardware without native bf16 trains in fp32 (vilbert.train.precision)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: dict[str, Any] = field(default_factory=dict)  # {"name": "vqa", ...the task's options}
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.output_dir) / "checkpoints")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """{"optim.lr": 1e-4, ...}: for tracking params."""
        def walk(prefix, value):
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    yield from walk(f"{prefix}.{k}" if prefix else k, v)
            else:
                yield prefix, value
        return dict(walk("", self.to_dict()))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(self.to_dict())), sort_keys=False))


def apply_override(tree: dict, assignment: str) -> None:
    """`optim.lr=5e-5` (values parsed as YAML: numbers, booleans, lists, null); `key=` is the
    empty string (`model.init=`: no pretrained model; `eval.shards=`: no evaluation)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not all(key.strip().split(".")):
        raise ConfigError(f"override {assignment!r} is not key=value (e.g. optim.lr=5e-5)")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {assignment!r}: {part} is a value, not a section")
    try:
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: the value is not YAML ({str(e).splitlines()[0]})") from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    tree = {}
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file")
        try:
            tree = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"--config {path} must hold a mapping of sections, not {type(tree).__name__}")
    for assignment in overrides:
        apply_override(tree, assignment)
    config = build_section(TrainConfig, tree, "")
    check_model_config(config.model)
    return config


def check_inputs(config: TrainConfig) -> None:
    """ConfigError for a file a training run reads that is not there (before it waits in a
    queue, or builds anything)."""
    from vilbert.bert_source import resolve_bert

    if not Path(config.deepspeed).is_file():
        raise ConfigError(f"deepspeed={config.deepspeed}: no such file (see deepspeed_configs/)")
    if config.model.bert:
        resolve_bert(config.model.bert)
    for key, value in (("model.init", config.model.init), ("data.tokenizer", config.data.tokenizer)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value}: no such file or directory")


def reconcile_batch_sizes(config: TrainConfig, world_size: int) -> int:
    """Gradient-accumulation steps so that micro batch x accumulation x world size = global batch."""
    micro, total = config.data.batch_size, config.optim.global_batch_size
    if total % (micro * world_size):
        raise ValueError(f"optim.global_batch_size={total} is not a multiple of data.batch_size={micro} (the "
                         f"micro batch per rank) x world size {world_size} = {micro * world_size}")
    return total // (micro * world_size)


def deepspeed_config(config: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON with batch sizes filled in from the training config (a batch size
    already set in the file must agree)."""
    ds = json.loads(Path(config.deepspeed).read_text())
    accumulation = reconcile_batch_sizes(config, world_size)
    wanted = {"train_batch_size": config.optim.global_batch_size,
              "train_micro_batch_size_per_gpu": config.data.batch_size,
              "gradient_accumulation_steps": accumulation}
    for key, value in wanted.items():
        if key in ds and ds[key] != value:
            raise ValueError(f"{config.deepspeed} sets {key}={ds[key]} but the training config implies {value} "
                             f"(world size {world_size}); remove it from the DeepSpeed file or make them agree")
        ds[key] = value
    if "gradient_clipping" not in ds:
        raise ValueError(f"{config.deepspeed} must set gradient_clipping explicitly (its default changed in 0.19.3)")
    return ds
