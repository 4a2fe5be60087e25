"""Input embeddings of the two streams."""

from __future__ import annotations

import torch
from torch import nn

from vilbert.config import ViLBERTConfig
from vilbert.modeling.dropout import Dropout
from vilbert.modeling.layer_norm import layer_norm

LOCATION_DIM = 5  # [x1/W, y1/H, x2/W, y2/H, box area / image area]


class TextEmbeddings(nn.Module):
    """BERT's embeddings: word + position + token type, LayerNorm, dropout."""

    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = layer_norm(config.hidden_size, config.layer_norm_eps, config.use_fused_layer_norm)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + \
            self.token_type_embeddings(token_type_ids)
        return self.dropout(self.norm(x))


class RegionEmbeddings(nn.Module):
    """Detector region features and their 5-d box locations: LayerNorm(W_f f + W_l l), dropout."""

    def __init__(self, config: ViLBERTConfig, hidden_size: int | None = None):
        super().__init__()
        hidden_size = hidden_size or config.v_hidden_size
        self.feature = nn.Linear(config.v_feature_size, hidden_size)
        self.location = nn.Linear(LOCATION_DIM, hidden_size)
        self.norm = layer_norm(hidden_size, config.layer_norm_eps, config.use_fused_layer_norm)
        self.dropout = Dropout(config.v_hidden_dropout_prob)

    def forward(self, features: torch.Tensor, locations: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.norm(self.feature(features) + self.location(locations)))
