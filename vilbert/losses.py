"""Pretraining objectives with the official semantics, written so that an empty selection
(no masked token, no masked region) gives 0 instead of NaN."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vilbert.kernels import load

IGNORE_INDEX = -100  # label of tokens that carry no masked-LM target (the official code used -1)


def labelled_positions(masked_lm_labels: torch.Tensor) -> torch.Tensor:
    """Flat indices into [B*T] of the tokens that carry a masked-LM label, in order."""
    return (masked_lm_labels != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def _zero(like: torch.Tensor) -> torch.Tensor:
    """A 0 that stays attached to the graph, so every parameter still gets a (zero) gradient."""
    return like.sum() * 0.0


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Cross-entropy over the labelled tokens. `logits` [N, V] are already gathered at the N
    labelled positions and `labels` [N] are their token ids. `fused`: apex's xentropy kernel on
    GPU (vilbert.kernels), which reads bf16/fp16 logits without an fp32 copy."""
    if labels.numel() == 0:
        return _zero(logits)
    xentropy = load("xentropy") if fused and logits.is_cuda else None
    if xentropy is not None:  # (logits, labels, smoothing, ignored label, fp32 losses)
        return xentropy.apply(logits, labels, 0.0, IGNORE_INDEX, True).mean()
    return F.cross_entropy(logits.float(), labels)


def masked_region_kl_loss(logits: torch.Tensor, target_probs: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """KL(detector distribution || predicted distribution), summed over classes and averaged
    over the masked regions. logits, target_probs: [B, R, C]; masked: [B, R] bool."""
    kl = F.kl_div(logits.float().log_softmax(-1), target_probs.float(), reduction="none").sum(-1)
    return (kl * masked).sum() / masked.sum().clamp(min=1)


def masked_region_regression_loss(predicted: torch.Tensor, target_features: torch.Tensor,
                                  masked: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every feature dimension of the masked regions."""
    squared = (predicted.float() - target_features.float()).pow(2) * masked[..., None]
    return squared.sum() / (masked.sum() * predicted.shape[-1]).clamp(min=1)


def masked_region_nce_loss(predicted: torch.Tensor, target_features: torch.Tensor, masked: torch.Tensor,
                           candidates: torch.Tensor, num_negative: int,
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise-contrastive estimation: the predicted vector of each masked region must score its
    own feature above `num_negative` features drawn uniformly from the other real regions of
    the batch (`candidates` [B, R] bool). The official code draws 70% of them from other
    images and 30% from the same image; uniform drawing keeps the same objective."""
    if not masked.any():
        return _zero(predicted)
    pool = target_features[candidates].float()  # [P, F]
    if pool.shape[0] < 2:
        return _zero(predicted)
    # Position of every masked region inside the candidate pool, to exclude it from its negatives.
    pool_index = candidates.flatten().cumsum(0).view_as(candidates) - 1
    own = pool_index[masked]  # [N]
    draws = torch.randint(pool.shape[0] - 1, (own.shape[0], num_negative), device=pool.device, generator=generator)
    draws = draws + (draws >= own[:, None]).long()  # skip the positive itself
    samples = torch.cat([target_features[masked].float()[:, None], pool[draws]], dim=1)  # [N, 1+K, F]
    scores = torch.einsum("nkf,nf->nk", samples, predicted[masked].float())
    return F.cross_entropy(scores, torch.zeros_like(own))


def alignment_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the image-caption alignment logits [B, 2]; label 0 = aligned, 1 = not."""
    return F.cross_entropy(logits.float(), labels)
