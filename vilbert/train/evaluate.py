"""Held-out evaluation during pretraining: the losses, masked-LM accuracy and image-caption
alignment accuracy on a fixed set of held-out batches."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vilbert.losses import IGNORE_INDEX

LOSSES = ("loss", "mlm_loss", "region_loss", "alignment_loss")


@torch.no_grad()
def evaluate(engine, batches: list, dtype: torch.dtype) -> dict[str, float]:
    """Every rank must pass the same number of batches (ZeRO-3 forwards are collective)."""
    engine.eval()
    sums = torch.zeros(len(LOSSES) + 5, dtype=torch.float64, device=engine.device)
    for batch in batches:
        batch = batch.to(engine.device)
        out = engine(**batch.model_inputs(dtype))
        labelled = batch.masked_lm_labels[batch.masked_lm_labels != IGNORE_INDEX]
        sums += torch.tensor([*(out[k].item() for k in LOSSES),
                              (out.alignment_logits.argmax(-1) == batch.alignment_labels).sum().item(),
                              len(batch),
                              (out.masked_lm_logits.argmax(-1) == labelled).sum().item(), labelled.numel(), 1.0],
                             dtype=torch.float64, device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(sums)
    engine.train()
    *losses, aligned, samples, mlm_right, mlm_total, batches_seen = sums.tolist()
    metrics = {f"val/{name}": value / batches_seen for name, value in zip(LOSSES, losses)}
    metrics["val/alignment_accuracy"] = aligned / samples
    metrics["val/mlm_accuracy"] = mlm_right / max(mlm_total, 1)
    return metrics
