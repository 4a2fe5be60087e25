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
import difflib
import json
import types
import typing
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
    # Pretraining on a toy world (vilbert.probes), at every evaluation, on the first held-out images:
    probe_images: int = 0  # the grounding probe on the objects of that many images; 0: none
    retrieval_queries: int = 0  # zero-shot retrieval: that many images rank their caption among 100; 0: none


@dataclass
class OptimConfig:
    lr: float = 1e-4
    fresh_lr: float = 0.0  # lr of the parameters that start fresh (not from model.bert / model.init); 0: lr
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
    retry_s: float = 60.0  # while MLflow is down, how often a checkpoint's commit tries again (a try may wait 10 s)


@dataclass
class DistributedConfig:
    timeout_s: float = 1800.0  # a collective waiting longer fails (gloo and NCCL); it may rightly wait for a big save
    heartbeat_s: float = 120.0  # a rank not heard from for this long (hung or dead) ends the job (train/heartbeat.py)


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


class ConfigError(ValueError):
    """A config value or file that cannot work; one line naming the key and what it takes."""


_POSITIVE, _NON_NEGATIVE, _UNIT = (lambda v: v > 0, "> 0"), (lambda v: v >= 0, ">= 0"), \
    (lambda v: 0 <= v <= 1, "in [0, 1]")
LIMITS = {  # dotted key -> (test, what it takes): values that would crash or hang a run later
    "data.fraction": (lambda v: 0 < v <= 1, "in (0, 1]"), "data.batch_size": _POSITIVE,
    "data.workers": _NON_NEGATIVE, "data.shuffle_buffer": _POSITIVE, "data.negative_buffer": _POSITIVE,
    "data.negative_probability": _UNIT, "data.max_bad_fraction": _UNIT,
    "eval.every_steps": _NON_NEGATIVE, "eval.every_epochs": _NON_NEGATIVE, "eval.max_batches": _POSITIVE,
    "eval.probe_images": _NON_NEGATIVE, "eval.retrieval_queries": _NON_NEGATIVE,
    "optim.lr": _POSITIVE, "optim.fresh_lr": _NON_NEGATIVE, "optim.weight_decay": _NON_NEGATIVE,
    "optim.eps": _POSITIVE,
    "optim.warmup_fraction": _UNIT, "optim.steps": _POSITIVE, "optim.epochs": _NON_NEGATIVE,
    "optim.global_batch_size": _POSITIVE, "optim.betas": (lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)"),
    "checkpoint.every_steps": _POSITIVE, "checkpoint.keep_last": _POSITIVE, "tracking.log_every": _POSITIVE,
    "tracking.retry_s": _NON_NEGATIVE, "distributed.timeout_s": _POSITIVE, "distributed.heartbeat_s": _POSITIVE,
}


def _typed(key: str, value, hint):
    """`value` as the field's type (`hint`), or ConfigError naming the key and the type."""
    def fail(expected: str):
        raise ConfigError(f"{key}={value!r} is not {expected}")

    if hint is Any:
        return value
    if typing.get_origin(hint) in (types.UnionType, typing.Union):  # `str | None`: None or the other type
        inner = [h for h in typing.get_args(hint) if h is not type(None)]
        return None if value is None else _typed(key, value, inner[0])
    if typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(_typed(f"{key}[{i}]", v, h) for i, (v, h) in enumerate(zip(value, args)))
    if typing.get_origin(hint) is dict:
        return value if isinstance(value, dict) else fail("a mapping (key: value lines)")
    if hint is bool:
        return value if isinstance(value, bool) else fail("true or false")
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail("an integer")
    if hint is float:
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                fail("a number")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail("a number")
    if hint is str:
        return value if isinstance(value, str) else fail("a string")
    return value


def build_section(cls, values: dict, where: str):
    """`cls` (a config dataclass) from YAML values. Unknown keys, values of the wrong type
    and values outside their range (LIMITS) are a ConfigError naming the key."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a mapping (key: value lines), "
                          f"not {values!r:.60}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(f'{where}{k}' for k in unknown)}; "
                          f"{where or 'top level'} takes {sorted(known)}")
    hints, defaults, kwargs = typing.get_type_hints(cls), cls(), {}
    for name, value in values.items():
        key, default = f"{where}{name}", getattr(defaults, name)
        if dataclasses.is_dataclass(default):
            kwargs[name] = build_section(type(default), {} if value is None else value, f"{key}.")
            continue
        kwargs[name] = _typed(key, value, hints[name])
        test, takes = LIMITS.get(key, (lambda v: True, ""))
        if not test(kwargs[name]):
            raise ConfigError(f"{key}={value!r} must be {takes}")
    return cls(**kwargs)


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
    from vilbert.config import PRESETS, ViLBERTConfig

    if config.model.preset not in PRESETS:
        raise ConfigError(f"model.preset={config.model.preset!r} is not a preset; choose from {sorted(PRESETS)}")
    fields = list(ViLBERTConfig.__annotations__)  # its own fields, not PretrainedConfig's
    for name in config.model.overrides:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            raise ConfigError(f"model.overrides.{name} is not a ViLBERTConfig field" +
                              (f"; did you mean {', '.join(close)}?" if close else " (see vilbert/config.py)"))
    return config


def check_inputs(config: TrainConfig) -> None:
    """ConfigError for a file a training run reads that is not there (before it waits in a
    queue, or builds anything)."""
    if not Path(config.deepspeed).is_file():
        raise ConfigError(f"deepspeed={config.deepspeed}: no such file (see deepspeed_configs/)")
    for key, value in (("model.init", config.model.init), ("model.bert", config.model.bert),
                       ("data.tokenizer", config.data.tokenizer)):
        if value and value != "minilm" and not Path(value).exists():
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
