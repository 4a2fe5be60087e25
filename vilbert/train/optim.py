"""AdamW with the paper's schedule: weight decay except on biases and LayerNorm weights,
linear warmup over the first 10% of steps, then linear decay to zero."""

from __future__ import annotations

import torch
from torch import nn

from vilbert.train.config import OptimConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # 1-d tensors are biases and LayerNorm weights; embeddings and matrices decay.
        (no_decay if param.ndim < 2 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, config: OptimConfig) -> torch.optim.Optimizer:
    """apex FusedAdam (AdamW mode) when NVIDIA apex is built and a GPU is used, else torch AdamW."""
    groups = parameter_groups(model, config.weight_decay)
    if torch.cuda.is_available():
        try:
            from apex.optimizers import FusedAdam

            return FusedAdam(groups, lr=config.lr, betas=config.betas, eps=config.eps, adam_w_mode=True)
        except ImportError:
            pass
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


def warmup_linear_decay(optimizer: torch.optim.Optimizer, config: OptimConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(config.warmup_fraction * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
