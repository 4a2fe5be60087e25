"""Held-out evaluation during pretraining: the losses, masked-LM accuracy and image-caption
alignment accuracy on a fixed set of held-out batches."""

from __future__ import annotations

import torch
import torch.distributed as dist

from vilbert.train.step_metrics import LOSSES


@torch.no_grad()
def evaluate(engine, batches: list, dtype: torch.dtype) -> dict[str, float]:
    """Every rank must pass the same number of batches (ZeRO-3 forwards are collective)."""
    engine.eval()
    sums = torch.zeros(len(LOSSES) + 2, dtype=torch.float64, device=engine.device)  # + alignment, MLM hits
    samples, labelled_tokens = 0, 0  # counted on the host
    for batch in batches:  # the device sums are read once, after the last batch
        samples, labelled_tokens = samples + len(batch), labelled_tokens + len(batch.masked_lm_positions)
        batch = batch.to(engine.device)
        out = engine(**batch.model_inputs(dtype))
        labels = batch.masked_lm_labels.flatten()[batch.masked_lm_positions]
        hits = [(out.alignment_logits.argmax(-1) == batch.alignment_labels).sum(),
                (out.masked_lm_logits.argmax(-1) == labels).sum()]
        sums += torch.stack([*(out[k].detach().double() for k in LOSSES), *(h.double() for h in hits)])
    totals = torch.cat([sums, torch.tensor([samples, labelled_tokens, len(batches)], dtype=torch.float64,
                                           device=engine.device)])
    if dist.is_initialized():
        dist.all_reduce(totals)
    engine.train()
    *losses, aligned, mlm_right, samples, mlm_total, batches_seen = totals.tolist()
    metrics = {f"val/{name}": value / batches_seen for name, value in zip(LOSSES, losses)}
    metrics["val/alignment_accuracy"] = aligned / samples
    metrics["val/mlm_accuracy"] = mlm_right / max(mlm_total, 1)
    return metrics
