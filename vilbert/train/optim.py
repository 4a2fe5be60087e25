"""AdamW with the paper's schedule: weight decay except on biases and LayerNorm weights,
linear warmup over the first 10% of steps, then linear decay to zero; optionally a higher lr
for the parameters that start fresh than for those loaded from a checkpoint (BERT)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vilbert.config_schema import checked, non_negative, positive, unit

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class OptimConfig:
    lr: float = positive(1e-4)
    fresh_lr: float = non_negative(0.0)  # lr of the parameters that start fresh (not from model.bert/init); 0: lr
    weight_decay: float = non_negative(0.01)  # not on biases and LayerNorm weights
    betas: tuple[float, float] = checked((0.9, 0.999), lambda v: all(0 <= b < 1 for b in v), "each in [0, 1)")
    eps: float = positive(1e-6)
    warmup_fraction: float = unit(0.1)  # linear warmup, then linear decay to 0
    steps: int = positive(1000)  # optimizer steps
    epochs: float = non_negative(0.0)  # instead of steps: passes over the training examples (the shard index counts)
    global_batch_size: int = positive(512)  # samples per optimizer step, all ranks together (micro: data.batch_size)


def parameter_groups(model: nn.Module, config: OptimConfig, loaded: frozenset[str] = frozenset()) -> list[dict]:
    """Decay / no decay, each split into the parameters loaded from a checkpoint (state-dict
    names in `loaded`; they train at `lr`) and the fresh ones (at `fresh_lr`, when set)."""
    state = model.state_dict(keep_vars=True)
    loaded_ids = {id(state[name]) for name in loaded}  # by identity: a tied weight has two names
    fresh_lr = config.fresh_lr or config.lr
    groups: dict[tuple[bool, bool], list] = {}
    for param in model.parameters():
        if param.requires_grad:
            # 1-d tensors are biases and LayerNorm weights; embeddings and matrices decay.
            groups.setdefault((param.ndim >= 2, id(param) in loaded_ids), []).append(param)
    order = sorted(groups, key=lambda key: (not key[1], not key[0]))  # loaded first: train/lr logs group 0's
    return [{"params": groups[decay, was_loaded], "weight_decay": config.weight_decay if decay else 0.0,
             "lr": config.lr if was_loaded else fresh_lr} for decay, was_loaded in order]


def build_optimizer(model: nn.Module, config: OptimConfig, loaded: frozenset[str] = frozenset(),
                    fused_adam: bool = False) -> torch.optim.Optimizer:
    """AdamW: apex's FusedAdam in AdamW mode with `fused_adam` (model.kernels chose it), else
    torch's fused AdamW: one pass over each tensor per step (on CPU 5x faster than its foreach
    path). `loaded`: the state-dict names that came from a checkpoint (see `parameter_groups`)."""
    import torch

    groups = parameter_groups(model, config, loaded)
    if fused_adam:
        from vilbert.kernels import load

        return load("fused_adam")(groups, lr=config.lr, betas=config.betas, eps=config.eps, adam_w_mode=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps, fused=True)


class WarmupLinearDecay:
    """The lr factor at a step: linear warmup to 1 over `warmup` steps, then linear decay to 0
    at `total`. A callable object rather than a closure, so that LambdaLR saves its fields in
    the checkpoint and a resumed run continues the exact schedule it was started with.

    A resume with a different `optim.steps` calls `retarget`: the decay then runs from the
    factor reached at the resumed step to 0 at the new total, so the lr never jumps; a run
    resumed inside its warmup finishes the warmup first, if the new total leaves room for it."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total
        self.anchor_step, self.anchor_factor = warmup, 1.0  # where the decay starts, and from what

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return max(0.0, self.anchor_factor * (self.total - step) / max(1, self.total - self.anchor_step))

    def retarget(self, total: int, step: int) -> None:
        if total == self.total or step >= total:
            return
        factor = self(step)
        if step >= self.warmup and factor == 0.0:
            raise ValueError(f"the lr schedule already decayed to 0 at step {step} (optim.steps was {self.total}); "
                             f"optim.steps={total} would train on at lr 0: start a new run instead")
        if step >= self.warmup or total <= self.warmup:  # decay from here (a warmup outlasting the run ends now)
            self.warmup = min(self.warmup, step)
            self.anchor_step, self.anchor_factor = step, factor
        self.total = total


def warmup_linear_decay(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    import torch

    warmup = max(1, round(config.warmup_fraction * config.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupLinearDecay(warmup, config.steps))


def retarget_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, total: int, step: int) -> None:
    """After loading a checkpoint: fit its schedule to `total` steps (see WarmupLinearDecay)."""
    for schedule in {id(s): s for s in scheduler.lr_lambdas}.values():
        schedule.retarget(total, step)
