"""Poolers and heads on top of the two streams (official `BertPreTrainingHeads` and the
task heads of `VILBertForVLTasks`)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from vilbert import losses
from vilbert.config import VISUAL_TARGET_KL, VISUAL_TARGET_REGRESSION, ViLBERTConfig
from vilbert.modeling.dropout import Dropout
from vilbert.modeling.layer_norm import layer_norm


class Pooler(nn.Module):
    """ReLU(W h_first) at the co-attention width (ViLBERT uses ReLU, not BERT's tanh)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.dense = nn.Linear(in_dim, out_dim)

    def forward(self, sequence: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.dense(sequence[:, 0]))


def fuse(text_pooled: torch.Tensor, region_pooled: torch.Tensor, method: str) -> torch.Tensor:
    """The joint image-text vector: h_IMG * h_CLS (the paper) or h_IMG + h_CLS."""
    return text_pooled * region_pooled if method == "mul" else text_pooled + region_pooled


class PredictionHead(nn.Module):
    """Dense -> activation -> LayerNorm -> decoder (BERT's LM head shape; also the region head)."""

    def __init__(self, dim: int, out_dim: int, act: str, config: ViLBERTConfig):
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.act = ACT2FN[act]
        self.norm = layer_norm(dim, config.layer_norm_eps, config.use_fused_layer_norm)
        self.decoder = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(self.act(self.dense(x))))


class PretrainingHeads(nn.Module):
    """Masked LM, masked region and alignment heads, and the losses they are trained with."""

    def __init__(self, config: ViLBERTConfig, text_dim: int, region_dim: int):
        super().__init__()
        self.config = config
        self.mlm = PredictionHead(text_dim, config.vocab_size, config.hidden_act, config)  # decoder tied to words
        self.region = PredictionHead(region_dim, config.v_target_size, config.v_hidden_act, config)
        self.alignment = nn.Linear(config.bi_hidden_size, 2)
        self.dropout = Dropout(0.1)  # fixed in the official heads

    def forward(self, text_sequence, region_sequence, text_pooled, region_pooled, region_mask,
                masked_lm_labels=None, masked_regions=None, region_targets=None, alignment_labels=None,
                masked_lm_positions=None):
        alignment_logits = self.alignment(self.dropout(fuse(text_pooled, region_pooled, self.config.fusion_method)))
        region_logits = self.region(region_sequence)
        out = dict(alignment_logits=alignment_logits, region_logits=region_logits)
        if masked_lm_labels is None:
            out["text_logits"] = self.mlm(text_sequence)
        else:
            # Project to the vocabulary only where there is a target: a fraction of the cost.
            if masked_lm_positions is None:
                masked_lm_positions = losses.labelled_positions(masked_lm_labels)
            out["masked_lm_logits"] = self.mlm(text_sequence.flatten(0, 1)[masked_lm_positions])
            out["mlm_loss"] = losses.masked_lm_loss(out["masked_lm_logits"],
                                                    masked_lm_labels.flatten()[masked_lm_positions],
                                                    fused=self.config.use_fused_xentropy)
        if masked_regions is not None and region_targets is not None:
            out["region_loss"] = self.region_loss(region_logits, region_targets, masked_regions.bool(), region_mask)
        if alignment_labels is not None:
            out["alignment_loss"] = losses.alignment_loss(alignment_logits, alignment_labels)
        terms = [out[k] for k in ("mlm_loss", "region_loss", "alignment_loss") if k in out]
        out["loss"] = sum(terms) if terms else None
        return out

    def region_loss(self, region_logits, region_targets, masked, region_mask):
        if self.config.visual_target == VISUAL_TARGET_KL:
            return losses.masked_region_kl_loss(region_logits, region_targets, masked)
        if self.config.visual_target == VISUAL_TARGET_REGRESSION:
            return losses.masked_region_regression_loss(region_logits, region_targets, masked)
        candidates = region_mask.bool().clone()
        candidates[:, 0] = False  # the IMG token is no region
        return losses.masked_region_nce_loss(region_logits, region_targets, masked, candidates,
                                             self.config.num_negative)


class VQAClassifier(nn.Sequential):
    """Official `SimpleClassifier`: Linear(bi, 2bi) -> GELU -> LayerNorm -> Linear(2bi, answers)."""

    def __init__(self, config: ViLBERTConfig):
        bi = config.bi_hidden_size
        super().__init__(nn.Linear(bi, 2 * bi), nn.GELU(),
                         layer_norm(2 * bi, config.layer_norm_eps, config.use_fused_layer_norm),
                         nn.Linear(2 * bi, config.num_vqa_answers))
