"""The fused Triton attention (`attention_backend: fused`) against the eager path: forward and
gradients within 1e-5 (relative to the largest value) in fp32 and 2e-2 in bf16, on random
shapes with padded keys, fully padded rows and a single region; attention dropout with the
kernels' own mask; a whole model. On CPU the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set by conftest.py), whose bf16 dot products are computed in fp32 (the
bf16 inputs and outputs are still rounded as on a GPU)."""

import math

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: pip install triton")

from helpers import make_inputs  # noqa: E402
from vilbert import ViLBERTConfig, ViLBERTForPretraining  # noqa: E402
from vilbert.modeling import fused_attention as kernels  # noqa: E402
from vilbert.modeling.attention import MASK_VALUE  # noqa: E402
from vilbert.modeling.fused_attention import dropout_mask, fused_attention, fused_co_attention  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def eager(q, k, v, bias, keep=None, p=0.0):
    probs = (q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias[:, None, None, :]).softmax(-1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return probs @ v


def close(a, b, dtype) -> bool:
    """Within the tolerance relative to the largest value, or to 1e-3 where everything is smaller
    (a gradient that is zero but for rounding, as q's with a single key, compares absolutely)."""
    return (a.float() - b.float()).abs().max().item() <= TOLERANCE[dtype] * max(b.float().abs().max().item(), 1e-3)


def _case(seed):
    """Random shapes: queries, keys (1 at times: a single region), head size, padding, a fully padded row."""
    g = torch.Generator().manual_seed(seed)
    b, h = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
    m, n = (int(torch.randint(1, 40, (1,), generator=g)) for _ in range(2))
    if seed % 3 == 0:
        n = 1
    d = [8, 16, 24, 64][seed % 4]
    bias = torch.zeros(b, n)
    for i in range(b):
        bias[i, int(torch.randint(1, n + 1, (1,), generator=g)):] = MASK_VALUE
    if b > 1:
        bias[-1] = MASK_VALUE  # every key padding: uniform weights, as the eager path
    return [torch.randn(b, h, length, d, generator=g) for length in (m, n, n)], bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", range(6))
def test_forward_and_gradients_match_the_eager_path(seed, dtype):
    tensors, bias = _case(seed)
    fused_inputs = [t.to(dtype).requires_grad_() for t in tensors]
    reference_inputs = [t.to(dtype).float().requires_grad_() for t in tensors]  # the same (rounded) values
    out = fused_attention(*fused_inputs, bias)
    reference = eager(*reference_inputs, bias)
    grad = torch.randn_like(reference)
    out.backward(grad.to(dtype))
    reference.backward(grad.to(dtype).float())
    assert out.dtype == dtype and out.shape == reference.shape
    assert close(out, reference, dtype), (out.float() - reference).abs().max()
    for fused, ref, name in zip(fused_inputs, reference_inputs, "qkv"):
        assert close(fused.grad, ref.grad, dtype), (name, (fused.grad.float() - ref.grad).abs().max())


def test_attention_dropout_is_the_kernels_mask_in_forward_and_backward():
    (q, k, v), bias = _case(1)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    p = 0.25
    out = fused_attention(q, k, v, bias, p, seed=1234)
    grad = torch.randn_like(out)
    out.backward(grad)
    fused_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    keep = dropout_mask(1234, q.shape[0] * q.shape[1], q.shape[2], k.shape[2], p, "cpu").view(*q.shape[:3], -1)
    assert set(keep.unique().tolist()) <= {0.0, 1.0} and abs(keep.mean().item() - (1 - p)) < 0.1
    reference = eager(q, k, v, bias, keep, p)
    reference.backward(grad)
    assert close(out, reference, torch.float32)
    for fused, t in zip(fused_grads, (q, k, v)):
        assert close(fused, t.grad, torch.float32)
    assert torch.equal(fused_attention(q, k, v, bias, p, seed=1234), out)  # the seed decides
    assert not torch.equal(fused_attention(q, k, v, bias, p, seed=99), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_co_attention_in_one_launch_equals_its_two_directions_apart(dtype):
    """19 text tokens (8 of one caption padding) and 3 regions (all of one image padding): the
    launch for both directions gives the outputs and gradients of the two single calls, bit
    for bit, with dropout (the same seeds). The single calls match eager (tests above)."""
    g = torch.Generator().manual_seed(5)
    b, h, d, text, regions = 2, 2, 16, 19, 3
    text_bias, region_bias = torch.zeros(b, text), torch.zeros(b, regions)
    text_bias[0, 11:] = MASK_VALUE
    region_bias[1] = MASK_VALUE
    lengths = [text, regions, regions, regions, text, text]  # text queries over regions, region queries over text
    tensors = [torch.randn(b, h, length, d, generator=g).to(dtype) for length in lengths]
    directions = [(tensors[0:3], region_bias, 0.2), (tensors[3:6], text_bias, 0.1)]
    grads = [torch.randn(b, h, length, d, generator=g).to(dtype) for length in (text, regions)]
    results = []
    for together in (True, False):
        inputs = [[t.clone().requires_grad_() for t in qkv] for qkv, _, _ in directions]
        problems = [(*qkv, bias, p) for qkv, (_, bias, p) in zip(inputs, directions)]
        if together:
            outs = fused_co_attention(*problems, seeds=(11, 12))
        else:
            outs = [fused_attention(*problem, seed=seed) for problem, seed in zip(problems, (11, 12))]
        torch.autograd.backward(outs, grads)
        results.append([*outs, *(t.grad for qkv in inputs for t in qkv)])
    assert [tuple(t.shape) for t in results[0][:2]] == [(b, h, text, d), (b, h, regions, d)]
    for name, together, apart in zip(["text out", "region out", *(f"{x}{i}" for i in (1, 2) for x in "qkv")],
                                     *results):
        assert torch.equal(together, apart), name
    with pytest.raises(ValueError, match="same batch, heads, head size"):
        fused_co_attention(problems[0], (tensors[3][:, :1], tensors[4][:, :1], tensors[5][:, :1], text_bias, 0.1))


def test_a_model_with_fused_attention_matches_sdpa(monkeypatch):
    """Every attention of the tiny model (self, and both directions of co-attention) and every
    sub-layer's tails fused (bias + GELU; bias + dropout + residual + LayerNorm): the outputs and
    gradients of the sdpa model (the layers' dropout off: the backends draw differently)."""
    from vilbert.modeling import fused_tails

    calls = []
    for name in ("bias_gelu", "bias_dropout_add_norm"):
        kernel = getattr(fused_tails, name)
        monkeypatch.setattr(fused_tails, name,
                            lambda *a, _name=name, _kernel=kernel: calls.append(_name) or _kernel(*a))
    launches, attend = [], kernels._FusedAttention.apply
    monkeypatch.setattr(kernels._FusedAttention, "apply",
                        lambda dropouts, *rest: launches.append(len(dropouts)) or attend(dropouts, *rest))
    results = []
    for backend in ("sdpa", "fused"):
        config = ViLBERTConfig.from_preset("tiny", attention_backend=backend, attention_probs_dropout_prob=0.0,
                                           v_attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0,
                                           v_hidden_dropout_prob=0.0)
        torch.manual_seed(0)
        model = ViLBERTForPretraining(config)
        torch.manual_seed(1)
        out = model(**make_inputs(config), alignment_labels=torch.tensor([0, 1, 0]))
        out.loss.backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (sdpa, sdpa_grads), (fused, fused_grads) = results
    layers = 3 + 2 + 2 * 2  # tiny: text and region layers, and both halves of each co-attention layer
    assert calls.count("bias_gelu") == layers and calls.count("bias_dropout_add_norm") == 2 * layers
    assert sorted(launches) == [1] * 5 + [2] * 2  # 5 self-attention layers; each co-attention layer once
    assert close(fused.text_logits, sdpa.text_logits, torch.float32) and torch.allclose(fused.loss, sdpa.loss)
    for name, grad in fused_grads.items():
        assert close(grad, sdpa_grads[name], torch.float32), name


def test_the_fused_backend_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    from vilbert.modeling.fused_attention import check_available

    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="runs on CUDA .* TRITON_INTERPRET=1"):
        check_available(torch.device("cpu"))
