"""An ablation file: the grid of pretraining variants and the tasks each is fine-tuned on.

    name: paper_toy
    output_dir: runs/ablations/paper_toy     # one folder per cell below it
    experiment: vilbert-ablations            # MLflow experiment of the parent run and every child
    tracking_uri: ""                         # default: $MLFLOW_TRACKING_URI, else sqlite beside output_dir
    pretrain:
      config: configs/toy.yaml
      overrides: {optim.steps: 1000}         # dotted keys, for every pretraining cell
    tasks:
      vqa: {config: configs/toy_vqa.yaml, overrides: {}}
    cells:                                   # optional: an explicit list of cells...
      - {model.arch: vilbert, data.fraction: 1.0}
      - {model.arch: single_stream, data.fraction: 0}
    axes:                                    # ...times the product of the axes (either may be alone)
      seed: [0, 1, 2]
    reference: {}                            # the cell the "vs one key" tables hold the other keys at
                                             # (default: the first cell that pretrains)

A cell is a set of dotted keys of the training config. All of them go to its pretraining;
`data.fraction: 0` means no pretraining (its fine-tunes start from BERT and fresh weights, the
paper's baseline). The keys under `model.` and `seed` go to its fine-tunes too (they build the
same model with the same seed); `seed` also seeds the data order (`data.seed`).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vilbert.config_schema import ConfigError

NO_PRETRAINING = ("data.fraction", 0)  # the cell value that means "fine-tune from BERT alone"
SEED = "seed"
CARRIED_TO_FINETUNING = ("model.", SEED)  # cell keys a fine-tune shares with its pretraining


@dataclass(frozen=True)
class Cell:
    values: dict[str, Any]  # dotted key -> value

    @property
    def pretrained(self) -> bool:
        key, none = NO_PRETRAINING
        return self.values.get(key, 1) != none

    @property
    def name(self) -> str:
        """A folder and run name: `arch=vilbert,fraction=0.25,seed=1` (the last part of each key)."""
        parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.values.items()]
        return re.sub(r"[^A-Za-z0-9=,._-]", "_", ",".join(parts)) or "base"

    def pretraining_overrides(self) -> list[str]:
        return _overrides(self.values)

    def finetuning_overrides(self) -> list[str]:
        return _overrides({key: value for key, value in self.values.items() if key.startswith(CARRIED_TO_FINETUNING)})

    def without(self, key: str) -> tuple:
        return tuple(sorted((k, repr(v)) for k, v in self.values.items() if k != key))


@dataclass(frozen=True)
class TaskRun:
    config: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ablation:
    name: str
    output_dir: Path
    experiment: str
    tracking_uri: str
    pretrain_config: str
    pretrain_overrides: dict[str, Any]
    tasks: dict[str, TaskRun]
    cells: list[Cell]
    reference: Cell
    source: Path  # the ablation file, logged with the parent run

    @property
    def uri(self) -> str:
        """The tracking store of the parent run and every job (one store for the whole grid)."""
        from vilbert.train.tracking import default_uri

        return self.tracking_uri or default_uri(self.output_dir)

    @property
    def keys(self) -> list[str]:
        """Every key some cell sets, in the order they first appear."""
        return list(dict.fromkeys(key for cell in self.cells for key in cell.values))

    def varied(self) -> list[str]:
        """The keys whose value differs between cells, seed excepted: the ablation's axes."""
        return [key for key in self.keys if key != SEED
                and len({repr(cell.values.get(key)) for cell in self.cells}) > 1]

    def cell_dir(self, cell: Cell) -> Path:
        return self.output_dir / cell.name

    def run_dir(self, cell: Cell, task: str | None = None) -> Path:
        """Where a cell's pretraining (task None) or one of its fine-tunes writes."""
        return self.cell_dir(cell) / (task or "pretrain")

    def pretraining_args(self, cell: Cell) -> list[str]:
        return ["pretrain", "--config", self.pretrain_config,
                *[f"{k}={_yaml(v)}" for k, v in self.pretrain_overrides.items()], *cell.pretraining_overrides(),
                f"output_dir={self.run_dir(cell)}"]

    def finetuning_args(self, cell: Cell, task: str) -> list[str]:
        run = self.tasks[task]
        init = self.run_dir(cell) / "model" if cell.pretrained else ""
        return ["finetune", "--task", task, "--config", run.config,
                *[f"{k}={_yaml(v)}" for k, v in run.overrides.items()], *cell.finetuning_overrides(),
                f"model.init={init}", f"output_dir={self.run_dir(cell, task)}"]


def _overrides(values: dict[str, Any]) -> list[str]:
    """`key=value` overrides of a cell's values; `seed` also seeds the data order (`data.seed`),
    unless the cell sets that itself."""
    if SEED in values:
        values = {"data.seed": values[SEED], **values}
    return [f"{key}={_yaml(value)}" for key, value in values.items()]


def _yaml(value: Any) -> str:
    """A value as a command-line override reads it back (YAML flow style, one line)."""
    return value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix(
        "\n...").strip()


def _mapping(tree: dict, key: str, where: str) -> dict:
    value = tree.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}{key} must be a mapping, not {type(value).__name__}")
    return value


def load_ablation(path: str | Path) -> Ablation:
    """Read and check an ablation file (ConfigError naming what is wrong)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"ablation file {path}: no such file")
    tree = yaml.safe_load(path.read_text()) or {}
    known = {"name", "output_dir", "experiment", "tracking_uri", "pretrain", "tasks", "cells", "axes", "reference"}
    if unknown := sorted(set(tree) - known):
        raise ConfigError(f"{path}: unknown keys {unknown} (an ablation file has {sorted(known)})")
    pretrain = _mapping(tree, "pretrain", "")
    if not pretrain.get("config"):
        raise ConfigError(f"{path}: pretrain.config (the base pretraining YAML) is required")
    tasks = {name: TaskRun(spec["config"], dict(spec.get("overrides") or {}))
             for name, spec in _mapping(tree, "tasks", "").items()}
    from vilbert.tasks import task_class

    for name in tasks:
        task_class(name)  # an unknown task fails here, naming the known ones
    for where, config in [("pretrain.config", pretrain["config"])] + [(f"tasks.{n}.config", t.config)
                                                                      for n, t in tasks.items()]:
        if not Path(config).is_file():
            raise ConfigError(f"{path}: {where}={config}: no such file")
    listed = tree.get("cells") or [{}]
    axes = _mapping(tree, "axes", "")
    if not isinstance(listed, list) or not all(isinstance(c, dict) for c in listed):
        raise ConfigError(f"{path}: cells must be a list of mappings (dotted key: value)")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: axes.{key} must be a non-empty list of values")
    cells = [Cell({**listed_cell, **dict(zip(axes, combo))})
             for listed_cell in listed for combo in itertools.product(*axes.values())]
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{path}: cells repeat ({', '.join(repeated)}): each cell must differ from the others")
    for cell in cells:
        fraction = cell.values.get(NO_PRETRAINING[0], 1)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ConfigError(f"{path}: cell {cell.name}: data.fraction must be in [0, 1] (0: no pretraining)")
    if not any(cell.pretrained for cell in cells) and not tasks:
        raise ConfigError(f"{path}: nothing to run (no cell pretrains and no tasks)")
    first = next((cell for cell in cells if cell.pretrained), cells[0])
    reference = Cell({**first.values, **_mapping(tree, "reference", "")})
    name = tree.get("name") or path.stem
    return Ablation(name=name, output_dir=Path(tree.get("output_dir") or f"runs/ablations/{name}"),
                    experiment=tree.get("experiment") or "vilbert-ablations",
                    tracking_uri=tree.get("tracking_uri") or "",
                    pretrain_config=pretrain["config"], pretrain_overrides=dict(pretrain.get("overrides") or {}),
                    tasks=tasks, cells=cells, reference=reference, source=path)
