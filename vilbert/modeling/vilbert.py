"""ViLBERT (Lu et al., NeurIPS 2019): a text stream (BERT) and a region stream joined by
co-attention layers, with the pretraining heads and the downstream task heads."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from vilbert.config import ViLBERTConfig
from vilbert.modeling.attention import MASK_VALUE, attention_bias
from vilbert.modeling.dropout import Dropout
from vilbert.modeling.embeddings import RegionEmbeddings, TextEmbeddings
from vilbert.modeling.encoder import TwoStreamEncoder
from vilbert.modeling.heads import Pooler, PretrainingHeads, VQAClassifier, fuse
from vilbert.modeling.outputs import ViLBERTModelOutput, ViLBERTPretrainingOutput, ViLBERTTaskOutput


class ViLBERTPreTrainedModel(PreTrainedModel):
    """Weight init (N(0, initializer_range) linears and embeddings, unit LayerNorms, zero
    biases: transformers' default, which is the official init) and save/load."""

    config_class = ViLBERTConfig
    base_model_prefix = "vilbert"

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every encoder layer's activations in the backward pass instead of keeping
        them (`model.activation_checkpointing`): the same gradients, less memory, one more forward."""
        for module in self.modules():
            if hasattr(module, "activation_checkpointing"):
                module.activation_checkpointing = enabled


def _all_real(features: torch.Tensor) -> torch.Tensor:
    return torch.ones(features.shape[:2], dtype=torch.long, device=features.device)


class ViLBERTModel(ViLBERTPreTrainedModel):
    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        self.text_embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config)
        self.encoder = TwoStreamEncoder(config)
        self.text_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.region_pooler = Pooler(config.v_hidden_size, config.bi_hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.text_embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor, region_features: torch.Tensor, region_locations: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                region_mask: torch.Tensor | None = None, output_attentions: bool = False) -> ViLBERTModelOutput:
        """input_ids/token_type_ids/attention_mask: [B, T]; region_features: [B, R, v_feature_size]
        with the IMG token (mean of the regions) first; region_locations: [B, R, 5];
        region_mask: [B, R] (1 = real). Masks are 1/0; padded positions influence nothing."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        text = self.text_embeddings(input_ids, token_type_ids)
        region = self.region_embeddings(region_features, region_locations)
        text_bias = attention_bias(_all_real(input_ids[..., None]) if attention_mask is None else attention_mask,
                                   text.dtype)
        region_bias = attention_bias(_all_real(region_features) if region_mask is None else region_mask, text.dtype)
        text, region, attentions = self.encoder(text, region, text_bias, region_bias, output_attentions)
        return ViLBERTModelOutput(text_sequence=text, region_sequence=region, text_pooled=self.text_pooler(text),
                                  region_pooled=self.region_pooler(region), attentions=attentions)


class ViLBERTForPretraining(ViLBERTPreTrainedModel):
    _tied_weights_keys = {"heads.mlm.decoder.weight": "vilbert.text_embeddings.word_embeddings.weight"}
    base_model_class = ViLBERTModel
    region_width_field = "v_hidden_size"

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        self.vilbert = self.base_model_class(config)
        self.heads = PretrainingHeads(config, config.hidden_size, getattr(config, self.region_width_field))
        self.post_init()

    def get_output_embeddings(self):
        return self.heads.mlm.decoder

    def forward(self, input_ids, region_features, region_locations, token_type_ids=None, attention_mask=None,
                region_mask=None, masked_lm_labels=None, masked_regions=None, region_targets=None,
                alignment_labels=None, masked_lm_positions=None,
                output_attentions: bool = False) -> ViLBERTPretrainingOutput:
        """Labels: masked_lm_labels [B, T] token ids (IGNORE_INDEX elsewhere); masked_regions
        [B, R] bool; region_targets [B, R, v_target_size] (detector class distribution for the
        KL objective, original features for regression/NCE); alignment_labels [B] (0 = aligned).
        masked_lm_positions [N]: optional flat indices into B*T of the labelled tokens, in order;
        given (the collator computes them on the host), the GPU never has to tell the host N."""
        out = self.vilbert(input_ids, region_features, region_locations, token_type_ids, attention_mask,
                           region_mask, output_attentions)
        if region_mask is None:
            region_mask = _all_real(region_features)
        heads = self.heads(out.text_sequence, out.region_sequence, out.text_pooled, out.region_pooled, region_mask,
                           masked_lm_labels, masked_regions, region_targets, alignment_labels, masked_lm_positions)
        return ViLBERTPretrainingOutput(**heads, **out)


class ViLBERTForTasks(ViLBERTPreTrainedModel):
    """The official multi-task model's heads: VQA answer classifier on the fused vector, an
    image-text pair score (VCR, retrieval) and a per-region score (referring expressions)."""

    base_model_class = ViLBERTModel
    region_width_field = "v_hidden_size"

    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        self.vilbert = self.base_model_class(config)
        self.dropout = Dropout(config.hidden_dropout_prob)
        self.vqa_head = VQAClassifier(config)
        self.pair_head = nn.Linear(config.bi_hidden_size, 1)
        self.region_head = nn.Linear(getattr(config, self.region_width_field), 1)
        self.post_init()

    def forward(self, input_ids, region_features, region_locations, token_type_ids=None, attention_mask=None,
                region_mask=None, output_attentions: bool = False) -> ViLBERTTaskOutput:
        out = self.vilbert(input_ids, region_features, region_locations, token_type_ids, attention_mask,
                           region_mask, output_attentions)
        fused = self.dropout(fuse(out.text_pooled, out.region_pooled, self.config.fusion_method))
        region_logits = self.region_head(self.dropout(out.region_sequence)).squeeze(-1)
        if region_mask is not None:
            region_logits = region_logits + (1.0 - region_mask.to(region_logits.dtype)) * MASK_VALUE
        return ViLBERTTaskOutput(vqa_logits=self.vqa_head(fused), pair_logits=self.pair_head(fused).squeeze(-1),
                                 region_logits=region_logits, **out)
