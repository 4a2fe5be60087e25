"""LayerNorm behind one switch: apex's FusedLayerNorm when NVIDIA apex is built (see
vilbert.kernels), torch otherwise. Both expose `weight` and `bias`, so checkpoints are
interchangeable."""

from torch import nn

from vilbert.kernels import load


def layer_norm(dim: int, eps: float, fused: bool = True) -> nn.Module:
    fused_layer_norm = load("fused_layer_norm") if fused else None
    return fused_layer_norm(dim, eps=eps) if fused_layer_norm else nn.LayerNorm(dim, eps=eps)
