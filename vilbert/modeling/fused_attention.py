"""Fused attention in Triton (`attention_backend: fused`): scores, padding bias, softmax,
attention dropout and the weighted sum of the values in one kernel, and its backward in two,
without the [queries, keys] probabilities ever in memory.

The forward walks the keys a block at a time with the running-max softmax (the flash-attention
scheme) and keeps each row's maximum and sum for the backward, which recomputes the
probabilities from them. Dropout draws one Philox number per (batch, head, query, key) from a seed drawn from
torch's generator, so the backward redraws the same mask and `torch.manual_seed` makes it
repeat. Padded keys get the official model's additive -10000 (`MASK_VALUE`), so a row whose
keys are all padding gets uniform weights as in the eager path, never NaN.

The two directions of a co-attention layer (text queries over regions, region queries over
text) are one launch of each kernel: the grid's third axis picks the direction, each with its
own lengths, padding and dropout, and self-attention is the same launch with one. Triton runs
on CUDA tensors; with
`TRITON_INTERPRET=1` it runs on CPU tensors (slowly), which is how the tests check it against
the eager path.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the fused backend then says what to install
    triton = None


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of `device`: CUDA, or any under the interpreter."""
    return triton is not None and (device.type == "cuda" or _interpreted())


def check_available(device: torch.device) -> None:
    """RuntimeError naming what is missing for the fused backend on `device`."""
    if triton is None:
        raise RuntimeError("attention_backend=fused needs triton: pip install triton")
    if not available(device):
        raise RuntimeError(f"attention_backend=fused runs on CUDA (tensors here are on {device}); on CPU use sdpa, "
                           "or TRITON_INTERPRET=1 to run the kernels in Triton's interpreter (tests)")


if triton is not None:
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """a @ b accumulated in fp32: exact fp32 products for fp32 inputs (no TF32), tensor cores
        for bf16; UPCAST (Triton's interpreter, whose bf16 dot product is wrong) in fp32."""
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)

    @triton.jit
    def _keep(seed, b_h, rows, cols, M, N, p):
        """The dropout mask of a block: one Philox number per (batch x head, query, key)."""
        offsets = (b_h * M + rows[:, None]) * N + cols[None, :]
        return tl.rand(seed, offsets) >= p

    @triton.jit
    def _key_block(K, V, b_h, cols, dims, N, D):
        """A block of keys and values (zeros past N), and where they are."""
        kv = (b_h * N + cols[:, None]) * D + dims[None, :]
        kv_mask = (cols[:, None] < N) & (dims[None, :] < D)
        return tl.load(K + kv, mask=kv_mask, other=0.0), tl.load(V + kv, mask=kv_mask, other=0.0), kv, kv_mask

    @triton.jit
    def _query_block(Q, dO, MAX, SUM, Delta, b_h, rows, dims, M, D):
        """A block of queries, their output gradients, row maxima, sums and rowsum(dO * O), and where they are."""
        qo = (b_h * M + rows[:, None]) * D + dims[None, :]
        qo_mask = (rows[:, None] < M) & (dims[None, :] < D)
        inside = rows < M
        return (tl.load(Q + qo, mask=qo_mask, other=0.0), tl.load(dO + qo, mask=qo_mask, other=0.0),
                tl.load(MAX + b_h * M + rows, mask=inside, other=0.0), tl.load(SUM + b_h * M + rows, mask=inside,
                                                                               other=1.0),
                tl.load(Delta + b_h * M + rows, mask=inside, other=0.0), qo, qo_mask)

    @triton.jit
    def _forward_block(Q, K, V, Bias, Out, MAX, SUM, seed, p, M, N, scale, D,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                       DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """The output, row maxima and sums of a block of queries, over all keys."""
        block, b_h = tl.program_id(0), tl.program_id(1)
        batch = b_h // HEADS
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q = tl.load(Q + (b_h * M + rows[:, None]) * D + dims[None, :], mask=(rows[:, None] < M) & (dims[None, :] < D),
                    other=0.0)
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            inside = cols < N
            k, v, _, _ = _key_block(K, V, b_h, cols, dims, N, D)
            bias = tl.load(Bias + batch * N + cols, mask=inside, other=0.0)
            scores = _dot(q, tl.trans(k), IEEE, UPCAST) * scale + bias[None, :]
            scores = tl.where(inside[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            weights = tl.exp(scores - new_max[:, None])
            correction = tl.exp(running_max - new_max)
            total = total * correction + tl.sum(weights, 1)
            if DROPOUT:
                weights = tl.where(_keep(seed, b_h, rows, cols, M, N, p), weights / (1 - p), 0.0)
            acc = acc * correction[:, None] + _dot(weights.to(v.dtype), v, IEEE, UPCAST)
            running_max = new_max
        out = acc / total[:, None]
        tl.store(Out + (b_h * M + rows[:, None]) * D + dims[None, :], out.to(Out.dtype.element_ty),
                 mask=(rows[:, None] < M) & (dims[None, :] < D))
        tl.store(MAX + b_h * M + rows, running_max, mask=rows < M)
        tl.store(SUM + b_h * M + rows, total, mask=rows < M)

    @triton.jit
    def _forward(Q, K, V, Bias, Out, MAX, SUM, seed, p, M, N,
                 Q2, K2, V2, Bias2, Out2, MAX2, SUM2, seed2, p2, M2, N2, scale, D,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                 DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Grid (query blocks of the longer problem, batch x heads, problems): the second problem,
        when launched, is program_id(2) == 1; blocks past a problem's queries do nothing."""
        if tl.program_id(2) == 0:
            if tl.program_id(0) * BLOCK_M < M:
                _forward_block(Q, K, V, Bias, Out, MAX, SUM, seed, p, M, N, scale, D,
                               BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)
        elif tl.program_id(0) * BLOCK_M < M2:
            _forward_block(Q2, K2, V2, Bias2, Out2, MAX2, SUM2, seed2, p2, M2, N2, scale, D,
                           BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)

    @triton.jit
    def _probabilities(q, k, Bias, row_max, row_sum, batch, b_h, rows, cols, seed, p, scale, M, N,
                       DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """A block's softmax probabilities (from the forward's row maxima and sums, so that they
        are its weights exactly: a log-sum-exp loses the low digits of rows whose keys are all
        padding, whose scores are near -10000) and their dropout factors."""
        inside = cols < N
        bias = tl.load(Bias + batch * N + cols, mask=inside, other=0.0)
        scores = _dot(q, tl.trans(k), IEEE, UPCAST) * scale + bias[None, :]
        scores = tl.where(inside[None, :] & (rows[:, None] < M), scores, float("-inf"))  # outside: weight 0
        probs = tl.exp(scores - row_max[:, None]) / row_sum[:, None]
        if DROPOUT:
            factor = tl.where(_keep(seed, b_h, rows, cols, M, N, p), 1.0 / (1 - p), 0.0)
        else:
            factor = tl.full(probs.shape, 1.0, tl.float32)
        return probs, factor

    @triton.jit
    def _backward_keys_block(Q, K, V, Bias, dO, MAX, SUM, Delta, dK, dV, seed, p, M, N, scale, D,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                             DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """dK and dV of a block of keys, over all queries."""
        block, b_h = tl.program_id(0), tl.program_id(1)
        batch = b_h // HEADS
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        k, v, kv, kv_mask = _key_block(K, V, b_h, cols, dims, N, D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start in range(0, M, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            q, do, row_max, row_sum, delta, _, _ = _query_block(Q, dO, MAX, SUM, Delta, b_h, rows, dims, M, D)
            probs, factor = _probabilities(q, k, Bias, row_max, row_sum, batch, b_h, rows, cols, seed, p, scale, M,
                                           N, DROPOUT, IEEE, UPCAST)
            dv += _dot(tl.trans((probs * factor).to(do.dtype)), do, IEEE, UPCAST)
            dprobs = _dot(do, tl.trans(v), IEEE, UPCAST) * factor
            dscores = probs * (dprobs - delta[:, None])
            dk += _dot(tl.trans(dscores.to(q.dtype)), q, IEEE, UPCAST) * scale
        tl.store(dK + kv, dk.to(dK.dtype.element_ty), mask=kv_mask)
        tl.store(dV + kv, dv.to(dV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _backward_keys(Q, K, V, Bias, dO, MAX, SUM, Delta, dK, dV, seed, p, M, N,
                       Q2, K2, V2, Bias2, dO2, MAX2, SUM2, Delta2, dK2, dV2, seed2, p2, M2, N2, scale, D,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                       DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Grid (key blocks of the longer problem, batch x heads, problems), as `_forward`."""
        if tl.program_id(2) == 0:
            if tl.program_id(0) * BLOCK_N < N:
                _backward_keys_block(Q, K, V, Bias, dO, MAX, SUM, Delta, dK, dV, seed, p, M, N, scale, D,
                                     BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)
        elif tl.program_id(0) * BLOCK_N < N2:
            _backward_keys_block(Q2, K2, V2, Bias2, dO2, MAX2, SUM2, Delta2, dK2, dV2, seed2, p2, M2, N2, scale, D,
                                 BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)

    @triton.jit
    def _backward_queries_block(Q, K, V, Bias, dO, MAX, SUM, Delta, dQ, seed, p, M, N, scale, D,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                                HEADS: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """dQ of a block of queries, over all keys."""
        block, b_h = tl.program_id(0), tl.program_id(1)
        batch = b_h // HEADS
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        q, do, row_max, row_sum, delta, qo, qo_mask = _query_block(Q, dO, MAX, SUM, Delta, b_h, rows, dims, M, D)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, N, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            k, v, _, _ = _key_block(K, V, b_h, cols, dims, N, D)
            probs, factor = _probabilities(q, k, Bias, row_max, row_sum, batch, b_h, rows, cols, seed, p, scale, M,
                                           N, DROPOUT, IEEE, UPCAST)
            dprobs = _dot(do, tl.trans(v), IEEE, UPCAST) * factor
            dscores = probs * (dprobs - delta[:, None])
            dq += _dot(dscores.to(k.dtype), k, IEEE, UPCAST) * scale
        tl.store(dQ + qo, dq.to(dQ.dtype.element_ty), mask=qo_mask)

    @triton.jit
    def _backward_queries(Q, K, V, Bias, dO, MAX, SUM, Delta, dQ, seed, p, M, N,
                          Q2, K2, V2, Bias2, dO2, MAX2, SUM2, Delta2, dQ2, seed2, p2, M2, N2, scale, D,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr,
                          DROPOUT: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
        """Grid (query blocks of the longer problem, batch x heads, problems), as `_forward`."""
        if tl.program_id(2) == 0:
            if tl.program_id(0) * BLOCK_M < M:
                _backward_queries_block(Q, K, V, Bias, dO, MAX, SUM, Delta, dQ, seed, p, M, N, scale, D,
                                        BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)
        elif tl.program_id(0) * BLOCK_M < M2:
            _backward_queries_block(Q2, K2, V2, Bias2, dO2, MAX2, SUM2, Delta2, dQ2, seed2, p2, M2, N2, scale, D,
                                    BLOCK_M, BLOCK_N, BLOCK_D, HEADS, DROPOUT, IEEE, UPCAST)

    @triton.jit
    def _mask(Out, seed, p, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The kernels' dropout mask as a tensor (for tests): 1 kept, 0 dropped."""
        block_m, block_n, b_h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        keep = _keep(seed, b_h, rows, cols, M, N, p)
        tl.store(Out + (b_h * M + rows[:, None]) * N + cols[None, :], keep.to(tl.float32),
                 mask=(rows[:, None] < M) & (cols[None, :] < N))


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def draw_seed(dropout: float) -> int:
    """A kernel's Philox dropout seed, drawn from torch's generator (so `torch.manual_seed` repeats
    it and activation checkpointing replays it); 0, drawing nothing, without dropout."""
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item()) if dropout > 0 else 0


def _options(q: torch.Tensor, dropouts: tuple[float, ...]) -> dict:
    """The kernels' compile-time options for these inputs."""
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))  # tl.dot wants every side a power of two >= 16
    # Query and key blocks sized by a tile row's bytes, so that the kernels' shared memory fits
    # every GPU from sm_80 (fp32 at head size 64 in 64-row blocks needs 129 kB: over the 99 kB
    # of sm_86/sm_89). tests/support/compile_kernels.py compiles them for those targets.
    row_bytes = block_d * q.element_size()
    block = 64 if row_bytes <= 128 else 32 if row_bytes <= 256 else 16
    return dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, HEADS=q.shape[1], DROPOUT=max(dropouts) > 0,
                IEEE=q.dtype == torch.float32, UPCAST=_interpreted())


def _launch(kernel, block: int, lengths: list[int], problems: list[tuple], q: torch.Tensor, options: dict) -> None:
    """`kernel` once for all `problems` (one or two): grid (blocks of the longest of `lengths`,
    batch x heads, problems). A single problem's arguments fill the second's places too, unread."""
    b, h, _, d = q.shape
    grid = (triton.cdiv(max(lengths), block), b * h, len(problems))
    kernel[grid](*problems[0], *problems[-1], d ** -0.5, d, **options)


class _FusedAttention(torch.autograd.Function):
    """Attention of one or two problems (a co-attention layer's two directions), one launch per
    kernel. Arguments: the dropouts and seeds of the problems, then each one's q, k, v, key bias."""

    @staticmethod
    def forward(ctx, dropouts: tuple[float, ...], seeds: tuple[int, ...], *tensors):
        problems, saved, outs = [], [], []
        for i, (p, seed) in enumerate(zip(dropouts, seeds)):
            q, k, v, bias = (t.contiguous() for t in tensors[4 * i:4 * i + 4])
            bias = bias.float()
            out = torch.empty_like(q)
            row_max = torch.empty(q.shape[0] * q.shape[1], q.shape[2], device=q.device, dtype=torch.float32)
            row_sum = torch.empty_like(row_max)
            problems.append((q, k, v, bias, out, row_max, row_sum, seed, p, q.shape[2], k.shape[2]))
            saved += [q, k, v, bias, out, row_max, row_sum]
            outs.append(out)
        q = problems[0][0]
        options = _options(q, dropouts)
        _launch(_forward, options["BLOCK_M"], [problem[0].shape[2] for problem in problems], problems, q, options)
        ctx.save_for_backward(*saved)
        ctx.dropouts, ctx.seeds = dropouts, seeds
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outs):
        saved = ctx.saved_tensors
        for_keys, for_queries, grads = [], [], []
        for i, (grad_out, p, seed) in enumerate(zip(grad_outs, ctx.dropouts, ctx.seeds)):
            q, k, v, bias, out, row_max, row_sum = saved[7 * i:7 * i + 7]
            grad_out = grad_out.contiguous()
            delta = (grad_out.float() * out.float()).sum(-1).flatten(0, 1)  # rowsum(dO * O), [B x H, M]
            dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
            inputs = (q, k, v, bias, grad_out, row_max, row_sum, delta)
            for_keys.append((*inputs, dk, dv, seed, p, q.shape[2], k.shape[2]))
            for_queries.append((*inputs, dq, seed, p, q.shape[2], k.shape[2]))
            grads += [dq, dk, dv, None]
        q = saved[0]
        options = _options(q, ctx.dropouts)
        _launch(_backward_keys, options["BLOCK_N"], [args[1].shape[2] for args in for_keys], for_keys, q, options)
        _launch(_backward_queries, options["BLOCK_M"], [args[0].shape[2] for args in for_queries], for_queries, q,
                options)
        return None, None, *grads


def _attend(problems: list[tuple], seeds: list[int] | None) -> tuple[torch.Tensor, ...]:
    first = problems[0][0]
    check_available(first.device)
    for q in (problem[0] for problem in problems[1:]):
        if (q.shape[:2], q.shape[3], q.dtype, q.device) != (first.shape[:2], first.shape[3], first.dtype, first.device):
            raise ValueError("fused co-attention: both directions need the same batch, heads, head size, dtype and "
                             f"device; got q {tuple(first.shape)} {first.dtype} and {tuple(q.shape)} {q.dtype}")
    dropouts = tuple(float(problem[4]) for problem in problems)
    seeds = tuple(seeds) if seeds is not None else tuple(draw_seed(p) for p in dropouts)
    return _FusedAttention.apply(dropouts, seeds, *(t for problem in problems for t in problem[:4]))


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor,
                    dropout: float = 0.0, seed: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + key_bias) v with attention dropout `dropout`, fused. q [B, H, M, D],
    k and v [B, H, N, D], key_bias [B, N] (additive: 0 for real keys, MASK_VALUE for padding).
    `seed`: the dropout draw (default: drawn from torch's generator)."""
    return _attend([(q, k, v, key_bias, dropout)], None if seed is None else [seed])[0]


def fused_co_attention(first: tuple, second: tuple, seeds: tuple[int, int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions of a co-attention layer in one launch per kernel: each of `first` and
    `second` is (q, k, v, key_bias, dropout) as `fused_attention` takes them; they share batch,
    heads, head size and dtype, not lengths. The outputs equal two `fused_attention` calls
    with the same seeds (by default one drawn for each direction)."""
    return _attend([first, second], seeds)


def dropout_mask(seed: int, batch_heads: int, m: int, n: int, dropout: float, device) -> torch.Tensor:
    """[batch x heads, M, N] the mask (1 kept) the kernels use with `seed`: for tests."""
    check_available(torch.device(device))
    out = torch.empty(batch_heads, m, n, device=device)
    _mask[(triton.cdiv(m, 16), triton.cdiv(n, 16), batch_heads)](out, seed, dropout, m, n, BLOCK_M=16, BLOCK_N=16)
    return out
