"""The engine's contract: what an objective gives the training loop (`vilbert.train.loop`).

The loop owns the optimizer, DeepSpeed, checkpoints, tracking and the run directory; an
objective owns what is trained and how it is judged. Two implement it:
`pretraining.PretrainingObjective` (masked multimodal modelling + alignment) and
`finetuning.FinetuningObjective` (a task of `vilbert.tasks`). A new way of training is a
new objective, not a new loop.

The `eval:` section is read here too: when to evaluate is the objective's business.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vilbert.config_schema import non_negative, positive

if TYPE_CHECKING:
    import torch
    from torch import nn


def best_names(metric: str) -> tuple[str, str]:
    """The names of the run-end summary of the best checkpoint: `val/accuracy` ->
    (`val/best_accuracy`, `val/best_step`). Beside the metric itself in MLflow's charts, whose
    sections follow the names' prefixes (a `best/` prefix would come before `train/`)."""
    split, _, name = metric.rpartition("/")
    prefix = f"{split}/" if split else ""
    return f"{prefix}best_{name}", f"{prefix}best_step"


@dataclass
class EvalConfig:
    shards: str = ""  # held-out shard set; empty: no evaluation
    every_steps: int = non_negative(0)  # 0: only at the end
    every_epochs: float = non_negative(0.0)  # instead of every_steps: in passes over the training examples
    max_batches: int = positive(50)  # pretraining: held-out batches, drawn once (fine-tuning evaluates the whole split)
    # Pretraining on a toy world (vilbert.probes), at every evaluation, on the first held-out images:
    probe_images: int = non_negative(0)  # the grounding probe on the objects of that many images; 0: none
    retrieval_queries: int = non_negative(0)  # zero-shot retrieval: that many images rank their caption among 100

    def due(self, step: int, last_step: int) -> bool:
        """Whether step `step` ends with an evaluation (always the last one, when there are held-out shards)."""
        return bool(self.shards) and (step == last_step or (self.every_steps > 0 and step % self.every_steps == 0))


class Objective(Protocol):
    name: str  # the progress bar's label
    metric_names: tuple[str, ...]  # what `step` returns, in order (logged as train/<name>)
    best_metric: str | None  # the validation metric whose best checkpoint becomes the model; None: the last
    loaded_parameters: frozenset[str]  # state-dict names loaded by build_model (optim.lr; the rest optim.fresh_lr)
    data_health: Any  # the training stream's sample counts (vilbert.data.pipeline.DataHealth), once streaming

    @property
    def examples_per_epoch(self) -> int: ...  # what optim.epochs and eval.every_epochs count

    @property
    def data_workers(self) -> int: ...  # data processes that take cores from torch's threads

    def build_model(self, device_type: str) -> nn.Module: ...  # the same initial weights on every rank (seeded before)

    def train_batches(self, seed_offset: int) -> Iterator: ...  # endless; seed_offset: the step resumed at

    def held_out(self) -> Any: ...  # what `evaluate` reads; None: no evaluation

    def step(self, engine, batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimise and the step's metrics (`metric_names`, detached, on the device)."""
        ...

    def evaluate(self, engine, held_out, dtype: torch.dtype) -> dict[str, float]:
        """The held-out metrics (`val/...`), the same on every rank."""
        ...
