"""The training configuration: one YAML file, overridable by dotted keys on the command line.

    model:      preset, BERT to start the text stream from (or a pretrained model to fine-tune),
                ViLBERTConfig overrides
    task:       fine-tuning only: the task's name and its own keys (vilbert/tasks/<name>.py)
    data:       shard set (vilbert.data.DataConfig) and the held-out shards
    optim:      AdamW, the paper's schedule, batch sizes, steps
    deepspeed:  path to a file in deepspeed_configs/ (ZeRO stage x precision)
    checkpoint: where, how often, how many to keep
    tracking:   MLflow experiment, run name, URI
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vilbert.data.pipeline import DataConfig


@dataclass
class ModelConfig:
    preset: str = "small"
    bert: str | None = None  # BERT checkpoint for the text stream: a directory, or "minilm" (the packaged MiniLM-L6)
    init: str = ""  # fine-tuning: a pretrained model directory (save_pretrained, convert-official); empty: none
    single_stream: bool = False  # the paper's single-stream baseline instead of ViLBERT
    overrides: dict[str, Any] = field(default_factory=dict)  # any ViLBERTConfig field


@dataclass
class EvalConfig:
    shards: str = ""  # held-out shard set; empty: no evaluation
    every_steps: int = 0  # 0: only at the end
    every_epochs: float = 0.0  # instead of every_steps: in passes over the training examples
    max_batches: int = 50  # pretraining: held-out batches, drawn once (fine-tuning evaluates the whole split)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.01  # not on biases and LayerNorm weights
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    warmup_fraction: float = 0.1  # linear warmup, then linear decay to 0
    steps: int = 1000  # optimizer steps
    epochs: float = 0.0  # instead of steps: passes over the training examples (the shard index counts them)
    global_batch_size: int = 512  # samples per optimizer step, all ranks together (micro batch: data.batch_size)


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <output_dir>/checkpoints
    every_steps: int = 500
    keep_last: int = 3


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow; metrics.jsonl is written regardless
    uri: str = ""  # default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "vilbert-pretraining"
    run_name: str = ""  # default: the output directory's name
    log_every: int = 10
    system_metrics: bool = True
    new_run: bool = False  # a resumed run continues its MLflow run; true: start a new one


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


def build_section(cls, values: dict, where: str):
    """`cls` (a config dataclass) from YAML values; unknown keys are an error naming them."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                         f"{where or 'top level'} takes {sorted(known)}")
    defaults, kwargs = cls(), {}
    for name, value in values.items():
        default = getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_section(type(default), value or {}, f"{where}{name}.")
        elif isinstance(default, tuple):
            kwargs[name] = tuple(value)
        elif isinstance(default, float) and isinstance(value, (int, str)):
            kwargs[name] = float(value)  # YAML reads 1e-4 (no dot) as a string
        else:
            kwargs[name] = value
    return cls(**kwargs)


def apply_override(tree: dict, assignment: str) -> None:
    """`optim.lr=5e-5` (values parsed as YAML: numbers, booleans, lists, null)."""
    key, sep, raw = assignment.partition("=")
    if not sep:
        raise ValueError(f"override {assignment!r} is not key=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    tree = yaml.safe_load(Path(path).read_text()) or {} if path else {}
    for assignment in overrides:
        apply_override(tree, assignment)
    return build_section(TrainConfig, tree, "")


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
