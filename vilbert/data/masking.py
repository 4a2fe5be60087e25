"""Masked multimodal modelling inputs, a whole batch at a time.

Tokens: each real token but [CLS]/[SEP] is chosen with probability 15%; a chosen token
becomes [MASK] 80% of the time, a random token 10%, stays 10% (BERT). Regions: each real
region but the IMG token is chosen with probability 15%; its features are zeroed 90% of
the time and kept 10% (the official ViLBERT loader). Every chosen token or region is a
prediction target.
"""

from __future__ import annotations

import torch

from vilbert.losses import IGNORE_INDEX

MASK_PROBABILITY = 0.15


def mask_tokens(input_ids: torch.Tensor, maskable: torch.Tensor, mask_token_id: int, vocab_size: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (masked input ids, labels with IGNORE_INDEX where nothing is predicted).
    `maskable` [B, T] bool marks real, non-special tokens."""
    chosen = (torch.rand(input_ids.shape, generator=generator) < MASK_PROBABILITY) & maskable
    labels = torch.where(chosen, input_ids, IGNORE_INDEX)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), mask_token_id, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


def mask_regions(features: torch.Tensor, maskable: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Choose regions and zero 90% of the chosen ones' features in place; returns the chosen
    [B, R] bool. `maskable` [B, R] bool marks real regions other than the IMG token."""
    chosen = (torch.rand(maskable.shape, generator=generator) < MASK_PROBABILITY) & maskable
    rows, slots = (chosen & (torch.rand(maskable.shape, generator=generator) < 0.9)).nonzero(as_tuple=True)
    features[rows, slots] = 0  # index the few zeroed regions: a boolean mask over [B, R, F] is slow
    return chosen
