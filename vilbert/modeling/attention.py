"""Multi-head attention of one stream's queries over a context stream, then the output
projection, residual and post-LayerNorm (BERT's attention sub-layer).

The context is the same stream for self-attention and the other stream for ViLBERT's
co-attention; only the widths differ, so one module serves both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vilbert.modeling import fused_tails
from vilbert.modeling.dropout import Dropout, dropout
from vilbert.modeling.fused_attention import available as triton_available
from vilbert.modeling.fused_attention import fused_attention
from vilbert.modeling.layer_norm import layer_norm

# The official model adds this to the scores of padded keys. Unlike -inf it keeps a row
# whose keys are all padding finite (uniform weights) instead of NaN.
MASK_VALUE = -10000.0


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, K] 1/0 padding mask -> additive [B, 1, 1, K] bias broadcast over heads and queries."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * MASK_VALUE


class Attention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int, attention_dim: int, num_heads: int, *,
                 attention_dropout: float, hidden_dropout: float, eps: float, backend: str,
                 fused_layer_norm: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = attention_dim // num_heads
        self.backend = backend
        self.attention_dropout = attention_dropout
        self.query = nn.Linear(query_dim, attention_dim)
        self.key = nn.Linear(context_dim, attention_dim)
        self.value = nn.Linear(context_dim, attention_dim)
        self.out = nn.Linear(attention_dim, query_dim)
        self.dropout = Dropout(hidden_dropout)
        self.norm = layer_norm(query_dim, eps, fused_layer_norm)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, H*D] -> [B, H, L, D]
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    @property
    def probability_dropout(self) -> float:
        return self.attention_dropout if self.training else 0.0

    def project(self, hidden: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Queries from `hidden`, keys and values from `context`, each [B, H, L, D]."""
        return self._heads(self.query(hidden)), self._heads(self.key(context)), self._heads(self.value(context))

    def mix(self, q, k, v, context_bias, need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The values mixed by the attention weights [B, H, M, D], and the weights when asked."""
        p = self.probability_dropout
        # sdpa has no CPU kernel with dropout: it falls back to its math path and bernoulli masks.
        # The eager branch is that math, with the cheaper mask.
        kernel = not need_weights and not (p > 0 and q.device.type == "cpu")
        if self.backend == "sdpa" and kernel:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=context_bias, dropout_p=p), None
        if self.backend == "fused" and not need_weights:
            return fused_attention(q, k, v, context_bias.flatten(1), p), None
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + context_bias
        probs = scores.softmax(dim=-1)
        return dropout(probs, p) @ v, probs

    def output(self, mixed: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Heads joined, projected, dropped out, added to `hidden` and normalised."""
        mixed = mixed.transpose(1, 2).flatten(2)
        if self.backend == "fused" and triton_available(mixed.device):
            return fused_tails.add_norm(F.linear(mixed, self.out.weight), self.out.bias, hidden, self.norm,
                                        self.dropout)
        return self.norm(self.dropout(self.out(mixed)) + hidden)

    def forward(self, hidden: torch.Tensor, context: torch.Tensor, context_bias: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        mixed, probs = self.mix(*self.project(hidden, context), context_bias, need_weights)
        return self.output(mixed, hidden), probs
