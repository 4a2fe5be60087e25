"""Transformer layers of ViLBERT: a self-attention layer for each stream, and the
co-attention layer that joins them.

A co-attention layer is two ordinary transformer layers run side by side whose
attention takes its keys and values from the *other* stream, both reading the streams
as they were before the layer (official `BertConnectionLayer`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.activations import ACT2FN

from vilbert.config import ViLBERTConfig
from vilbert.kernels import TANH_GELU, load
from vilbert.modeling import fused_tails
from vilbert.modeling.attention import Attention
from vilbert.modeling.dropout import Dropout
from vilbert.modeling.fused_attention import available as triton_available
from vilbert.modeling.fused_attention import fused_co_attention
from vilbert.modeling.layer_norm import layer_norm


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner_dim: int, act: str, dropout: float, eps: float, fused_layer_norm: bool,
                 fused_dense: bool = False, fuse_tails: bool = False):
        super().__init__()
        self.fuse_tails = fuse_tails  # attention_backend=fused: bias+GELU, bias+dropout+residual+LayerNorm fused
        self.exact_gelu = act == "gelu"
        self.up = nn.Linear(dim, inner_dim)
        self.act = ACT2FN[act]  # "gelu" is the exact (erf) GELU, as in the official model
        self.down = nn.Linear(inner_dim, dim)
        self.dropout = Dropout(dropout)
        self.norm = layer_norm(dim, eps, fused_layer_norm)
        # apex: up, GELU and down in one call. Its GELU is the tanh approximation: only for that act.
        if fused_dense and act not in TANH_GELU:
            raise ValueError(f"use_fused_dense: apex's fused GELU is the tanh approximation, this layer's is {act!r}")
        self.fused_dense = load("fused_dense") if fused_dense else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_dense is not None and x.is_cuda:
            inner = self.fused_dense(x.flatten(0, -2), self.up.weight, self.up.bias, self.down.weight,
                                     self.down.bias).view_as(x)
        elif self.fuse_tails and triton_available(x.device):
            up = F.linear(x, self.up.weight)
            up = fused_tails.bias_gelu(up, self.up.bias) if self.exact_gelu else self.act(up + self.up.bias)
            return fused_tails.add_norm(F.linear(up, self.down.weight), self.down.bias, x, self.norm, self.dropout)
        else:
            inner = self.down(self.act(self.up(x)))
        return self.norm(self.dropout(inner) + x)


class TransformerLayer(nn.Module):
    """Attention over a context (itself, or the other stream) followed by a feed-forward block."""

    def __init__(self, attention: Attention, feed_forward: FeedForward):
        super().__init__()
        self.attention = attention
        self.feed_forward = feed_forward

    def forward(self, hidden, context, context_bias, need_weights=False):
        hidden, probs = self.attention(hidden, context, context_bias, need_weights)
        return self.feed_forward(hidden), probs


def run_layer(layer: nn.Module, *args, checkpointed: bool = False):
    """`layer(*args)`; with `checkpointed` (`model.activation_checkpointing`), in training, its
    activations are not kept but recomputed in the backward pass (the same dropout masks:
    the random state is replayed), trading a second forward for the memory of large batches."""
    if checkpointed and layer.training and torch.is_grad_enabled():
        return checkpoint(layer, *args, use_reentrant=False)
    return layer(*args)


def _stream_dims(config: ViLBERTConfig, stream: str) -> dict:
    """Width, heads, feed-forward size, activation and dropouts of one stream."""
    if stream == "text":
        return dict(dim=config.hidden_size, heads=config.num_attention_heads, inner=config.intermediate_size,
                    act=config.hidden_act, hidden_dropout=config.hidden_dropout_prob,
                    attention_dropout=config.attention_probs_dropout_prob)
    return dict(dim=config.v_hidden_size, heads=config.v_num_attention_heads, inner=config.v_intermediate_size,
                act=config.v_hidden_act, hidden_dropout=config.v_hidden_dropout_prob,
                attention_dropout=config.v_attention_probs_dropout_prob)


def build_layer(config: ViLBERTConfig, stream: str, context_stream: str | None = None) -> TransformerLayer:
    """A layer of `stream` ("text" or "region"). With `context_stream` set to the other
    stream it is that stream's half of a co-attention layer: attention runs at the
    co-attention width, and attention-probability dropout follows the stream of the keys."""
    own = _stream_dims(config, stream)
    common = dict(eps=config.layer_norm_eps, fused_layer_norm=config.use_fused_layer_norm)
    if context_stream is None:
        context_dim, attention_dim = own["dim"], own["dim"]
        heads, attention_dropout = own["heads"], own["attention_dropout"]
    else:
        other = _stream_dims(config, context_stream)
        context_dim, attention_dim = other["dim"], config.bi_hidden_size
        heads, attention_dropout = config.bi_num_attention_heads, other["attention_dropout"]
    attention = Attention(own["dim"], context_dim, attention_dim, heads, attention_dropout=attention_dropout,
                          hidden_dropout=own["hidden_dropout"], backend=config.attention_backend, **common)
    feed_forward = FeedForward(own["dim"], own["inner"], own["act"], own["hidden_dropout"],
                               fused_dense=config.use_fused_dense, fuse_tails=config.attention_backend == "fused",
                               **common)
    return TransformerLayer(attention, feed_forward)


class CoAttentionLayer(nn.Module):
    def __init__(self, config: ViLBERTConfig):
        super().__init__()
        self.text = build_layer(config, "text", context_stream="region")  # text queries, region keys/values
        self.region = build_layer(config, "region", context_stream="text")  # region queries, text keys/values

    def forward(self, text, region, text_bias, region_bias, need_weights=False):
        if self.text.attention.backend == "fused" and not need_weights:  # both directions: one launch per kernel
            to_text, to_region = self.text.attention, self.region.attention
            mixed_text, mixed_region = fused_co_attention(
                (*to_text.project(text, region), region_bias.flatten(1), to_text.probability_dropout),
                (*to_region.project(region, text), text_bias.flatten(1), to_region.probability_dropout))
            return (self.text.feed_forward(to_text.output(mixed_text, text)),
                    self.region.feed_forward(to_region.output(mixed_region, region)), (None, None))
        new_text, text_probs = self.text(text, region, region_bias, need_weights)
        new_region, region_probs = self.region(region, text, text_bias, need_weights)
        return new_text, new_region, (text_probs, region_probs)
