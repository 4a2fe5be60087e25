"""The fused sub-layer tails (`attention_backend: fused`): bias + GELU and bias + dropout +
residual + LayerNorm against torch, forward and every gradient within 1e-5 (relative to the
largest value) in fp32 and 2e-2 in bf16, with the kernels' own dropout mask. On CPU in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1)."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: pip install triton")

from vilbert.modeling import fused_tails  # noqa: E402
from vilbert.modeling.fused_attention import dropout_mask  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (rows as a shape, width): widths that are no power of two, more rows than the
# backward has programs (each program then sums several rows' gradients).
SHAPES = [((3, 5), 40), ((2,), 128), ((4, 3), 3), ((300,), 8)]


def close(a, b, dtype) -> bool:
    return (a.float() - b.float()).abs().max().item() <= TOLERANCE[dtype] * max(b.float().abs().max().item(), 1e-3)


def _run(fn, inputs, grad):
    """fn's output and the gradients of `inputs`."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad.to(out.dtype))
    return [out] + [t.grad for t in inputs]


def _inputs(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    values = [torch.randn(*shape, generator=g) for shape in shapes]
    return ([v.to(dtype).requires_grad_() for v in values],  # fused
            [v.to(dtype).float().requires_grad_() for v in values])  # torch on the same rounded values, in fp32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", SHAPES)
def test_bias_gelu_matches_torch(rows, width, dtype):
    fused, reference = _inputs([(*rows, width), (width,)], dtype)
    grad = torch.randn(*rows, width)
    ours = _run(fused_tails.bias_gelu, fused, grad)
    theirs = _run(lambda x, b: F.gelu(x + b), reference, grad.to(dtype).float())
    assert ours[0].dtype == dtype
    for name, mine, expected in zip(("out", "x", "bias"), ours, theirs):
        assert close(mine, expected, dtype), (name, (mine.float() - expected).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_bias_dropout_add_norm_matches_torch_with_the_kernels_mask(rows, width, dtype, p):
    shapes = [(*rows, width), (width,), (*rows, width), (width,), (width,)]  # x, bias, residual, weight, beta
    fused, reference = _inputs(shapes, dtype, seed=width)
    grad = torch.randn(*rows, width)
    seed, eps = 1234, 1e-12
    ours = _run(lambda *t: fused_tails.bias_dropout_add_norm(*t, p, eps, seed), fused, grad)
    keep = dropout_mask(seed, 1, grad.numel() // width, width, p, "cpu").view(*rows, width)
    if p:
        assert 0.55 < keep.mean().item() < 0.95 or keep.numel() < 20

    def reference_fn(x, bias, residual, weight, beta):
        return F.layer_norm((x + bias) * keep / (1 - p) + residual, (width,), weight, beta, eps)

    theirs = _run(reference_fn, reference, grad.to(dtype).float())
    assert ours[0].dtype == dtype
    for name, mine, expected in zip(("out", "x", "bias", "residual", "weight", "beta"), ours, theirs):
        assert close(mine, expected, dtype), (name, (mine.float() - expected).abs().max())


def test_a_seed_from_torchs_generator_repeats_the_dropout():
    x, bias, residual = torch.randn(6, 16), torch.zeros(16), torch.zeros(6, 16)
    weight, beta = torch.ones(16), torch.zeros(16)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(fused_tails.bias_dropout_add_norm(x, bias, residual, weight, beta, 0.5, 1e-12))
    assert torch.equal(*runs)
    assert not torch.equal(runs[0], fused_tails.bias_dropout_add_norm(x, bias, residual, weight, beta, 0.5, 1e-12))
