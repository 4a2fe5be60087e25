"""The paper's single-stream baseline: one BERT over the concatenated text and region
sequence, initialised from BERT, trained with the same heads and objectives as ViLBERT.

Regions are embedded at the text width (LayerNorm(W_f f + W_l l)) and every BERT layer
attends over both modalities; [CLS] and the IMG token are pooled as in ViLBERT.
"""

from __future__ import annotations

import torch
from torch import nn

from vilbert.config import ViLBERTConfig
from vilbert.modeling.attention import attention_bias
from vilbert.modeling.embeddings import RegionEmbeddings, TextEmbeddings
from vilbert.modeling.heads import Pooler
from vilbert.modeling.layers import build_layer, run_layer
from vilbert.modeling.outputs import ViLBERTModelOutput
from vilbert.modeling.vilbert import ViLBERTForPretraining, ViLBERTForTasks, ViLBERTPreTrainedModel, _all_real


class SingleStreamEncoder(nn.Module):
    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.text_layers = nn.ModuleList(build_layer(config, "text") for _ in range(config.num_hidden_layers))
        self.activation_checkpointing = False  # model.activation_checkpointing: recompute each layer in backward

    def forward(self, hidden, bias):
        for layer in self.text_layers:
            hidden, _ = run_layer(layer, hidden, hidden, bias, checkpointed=self.activation_checkpointing)
        return hidden


class SingleStreamModel(ViLBERTPreTrainedModel):
    def __init__(self, config: ViLBERTConfig):
        super().__init__(config)
        self.text_embeddings = TextEmbeddings(config)
        self.region_embeddings = RegionEmbeddings(config, hidden_size=config.hidden_size)
        self.encoder = SingleStreamEncoder(config)
        self.text_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.region_pooler = Pooler(config.hidden_size, config.bi_hidden_size)
        self.post_init()

    def forward(self, input_ids, region_features, region_locations, token_type_ids=None, attention_mask=None,
                region_mask=None, output_attentions: bool = False) -> ViLBERTModelOutput:
        if output_attentions:
            raise ValueError("the single-stream baseline does not return attention maps")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        attention_mask = _all_real(input_ids[..., None]) if attention_mask is None else attention_mask
        region_mask = _all_real(region_features) if region_mask is None else region_mask
        text = self.text_embeddings(input_ids, token_type_ids)
        region = self.region_embeddings(region_features, region_locations)
        joint = self.encoder(torch.cat([text, region], dim=1),
                             attention_bias(torch.cat([attention_mask, region_mask], dim=1), text.dtype))
        text, region = joint.split([text.shape[1], region.shape[1]], dim=1)
        return ViLBERTModelOutput(text_sequence=text, region_sequence=region, text_pooled=self.text_pooler(text),
                                  region_pooled=self.region_pooler(region))


class SingleStreamForPretraining(ViLBERTForPretraining):
    """ViLBERT's pretraining heads and objectives on the single-stream encoder."""

    base_model_class = SingleStreamModel
    region_width_field = "hidden_size"  # regions live at the text width


class SingleStreamForTasks(ViLBERTForTasks):
    """ViLBERT's task heads on the single-stream encoder (the paper's Table 1 baseline)."""

    base_model_class = SingleStreamModel
    region_width_field = "hidden_size"
