"""LayerNorm behind one switch: apex's fused kernel when NVIDIA apex is installed, torch otherwise.

Both expose `weight` and `bias`, so checkpoints are interchangeable. Real apex is built
from source on GPU clusters; the unrelated PyPI package called `apex` has no
`apex.normalization` and is therefore ignored here.
"""

from torch import nn

try:
    from apex.normalization import FusedLayerNorm as _ApexLayerNorm
except ImportError:  # no apex, or the unrelated PyPI package of that name
    _ApexLayerNorm = None

APEX_AVAILABLE = _ApexLayerNorm is not None


def layer_norm(dim: int, eps: float, fused: bool = True) -> nn.Module:
    if fused and APEX_AVAILABLE:
        return _ApexLayerNorm(dim, eps=eps)
    return nn.LayerNorm(dim, eps=eps)
