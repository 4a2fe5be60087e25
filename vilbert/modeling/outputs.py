"""Named outputs of the models (transformers `ModelOutput` dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from vilbert.modeling.encoder import EncoderAttentions


@dataclass
class ViLBERTModelOutput(ModelOutput):
    text_sequence: torch.Tensor | None = None  # [B, T, hidden_size] final text states
    region_sequence: torch.Tensor | None = None  # [B, R, v_hidden_size] final region states (IMG first)
    text_pooled: torch.Tensor | None = None  # [B, bi_hidden_size] ReLU-pooled [CLS]
    region_pooled: torch.Tensor | None = None  # [B, bi_hidden_size] ReLU-pooled IMG token
    attentions: EncoderAttentions | None = None  # with output_attentions=True


@dataclass
class ViLBERTPretrainingOutput(ModelOutput):
    loss: torch.Tensor | None = None  # sum of the loss terms whose labels were given
    mlm_loss: torch.Tensor | None = None
    region_loss: torch.Tensor | None = None
    alignment_loss: torch.Tensor | None = None
    masked_lm_logits: torch.Tensor | None = None  # [N, V] at the N labelled tokens (when labels are given)
    text_logits: torch.Tensor | None = None  # [B, T, V] at every token (only when no MLM labels are given)
    region_logits: torch.Tensor | None = None  # [B, R, v_target_size]
    alignment_logits: torch.Tensor | None = None  # [B, 2]; index 0 = aligned
    text_sequence: torch.Tensor | None = None
    region_sequence: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    region_pooled: torch.Tensor | None = None
    attentions: EncoderAttentions | None = None


@dataclass
class ViLBERTTaskOutput(ModelOutput):
    vqa_logits: torch.Tensor | None = None  # [B, num_vqa_answers] (VQA 2.0, soft-score targets)
    pair_logits: torch.Tensor | None = None  # [B] image-text pair score (VCR, retrieval)
    region_logits: torch.Tensor | None = None  # [B, R] region score (referring expressions), -10000 on padding
    text_sequence: torch.Tensor | None = None
    region_sequence: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    region_pooled: torch.Tensor | None = None
    attentions: EncoderAttentions | None = None
