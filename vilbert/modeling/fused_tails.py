"""The elementwise tails of a transformer sub-layer, fused in Triton (`attention_backend: fused`).

After its matmuls a BERT sub-layer runs a chain of elementwise passes over [tokens, width]
tensors: bias + GELU inside the feed-forward, and bias + dropout + residual + LayerNorm at the
end of both the attention and the feed-forward block. Each is one kernel here, and its backward
one more, instead of a pass (and a stored intermediate) per op:

- `bias_gelu(x, bias)`: GELU(x + bias), the exact (erf) GELU of the official model.
- `bias_dropout_add_norm(x, bias, residual, weight, beta, p, eps)`: LayerNorm(dropout(x + bias)
  + residual). The backward recomputes the sum from x, the residual and the row's saved mean
  and 1/std, so nothing but those two numbers per row is kept beyond the inputs; the dropout
  mask is redrawn from its Philox seed (drawn from torch's generator, as the attention kernel's).
  The gradients of the LayerNorm's weight and bias and of `bias` are summed per program over its
  rows, then over the programs in torch: deterministic, no atomics.

Both run on CUDA tensors, and on CPU tensors in Triton's interpreter (`TRITON_INTERPRET=1`),
which is how the tests check them against torch. Whether they beat torch's separate kernels (or
torch.compile's own fusions) on a GPU is what `benchmarks/gpu.sh` measures: no GPU was available.
"""

from __future__ import annotations

import torch

from vilbert.modeling.fused_attention import draw_seed, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _gelu_and_slope(h):
        """GELU(h) = h Phi(h) and its derivative Phi(h) + h phi(h), in fp32 (1/sqrt(2), 1/sqrt(2 pi))."""
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        return h * cdf, cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327

    @triton.jit
    def _biased_block(X, B, numel, width, BLOCK: tl.constexpr):
        """This program's block of x + bias in fp32, its offsets and which of them are inside."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < numel
        h = tl.load(X + offsets, mask=inside).to(tl.float32) + tl.load(B + offsets % width, mask=inside).to(tl.float32)
        return h, offsets, inside

    @triton.jit
    def _bias_gelu_forward(X, B, Y, numel, width, BLOCK: tl.constexpr):
        h, offsets, inside = _biased_block(X, B, numel, width, BLOCK)
        y, _ = _gelu_and_slope(h)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=inside)

    @triton.jit
    def _bias_gelu_backward(X, B, dY, dX, numel, width, BLOCK: tl.constexpr):
        h, offsets, inside = _biased_block(X, B, numel, width, BLOCK)
        _, slope = _gelu_and_slope(h)
        dy = tl.load(dY + offsets, mask=inside).to(tl.float32)
        tl.store(dX + offsets, (dy * slope).to(dX.dtype.element_ty), mask=inside)

    @triton.jit
    def _summed_row(X, B, R, row, cols, inside, seed, p, width, DROPOUT: tl.constexpr):
        """dropout(x + bias) + residual of one row in fp32, and its dropout factors."""
        x = tl.load(X + row * width + cols, mask=inside, other=0.0).to(tl.float32) + \
            tl.load(B + cols, mask=inside, other=0.0).to(tl.float32)
        factor = tl.full(x.shape, 1.0, tl.float32)
        if DROPOUT:
            keep = tl.rand(seed, row * width + cols) >= p
            factor = tl.where(keep, 1.0 / (1.0 - p), 0.0)
        return x * factor + tl.load(R + row * width + cols, mask=inside, other=0.0).to(tl.float32), factor

    @triton.jit
    def _add_norm_forward(X, B, R, W, Beta, Y, Mean, Rstd, seed, p, eps, width,
                          BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        h, _ = _summed_row(X, B, R, row, cols, inside, seed, p, width, DROPOUT)
        mean = tl.sum(h, 0) / width
        centred = tl.where(inside, h - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, 0) / width + eps)
        w = tl.load(W + cols, mask=inside).to(tl.float32)
        beta = tl.load(Beta + cols, mask=inside).to(tl.float32)
        tl.store(Y + row * width + cols, (centred * rstd * w + beta).to(Y.dtype.element_ty), mask=inside)
        tl.store(Mean + row, mean)
        tl.store(Rstd + row, rstd)

    @triton.jit
    def _add_norm_backward(X, B, R, W, dY, dX, dR, Mean, Rstd, PartW, PartBeta, PartB, seed, p, rows, width,
                           programs, BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
        """Rows program, program + programs, ...: dx and dresidual per row; the sums over these rows
        of the weight's, beta's and bias's gradients into row `program` of the Part buffers."""
        program = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        w = tl.load(W + cols, mask=inside).to(tl.float32)
        part_w = tl.zeros([BLOCK], tl.float32)
        part_beta = tl.zeros([BLOCK], tl.float32)
        part_b = tl.zeros([BLOCK], tl.float32)
        for row in range(program, rows, programs):
            h, factor = _summed_row(X, B, R, row, cols, inside, seed, p, width, DROPOUT)
            xhat = tl.where(inside, (h - tl.load(Mean + row)) * tl.load(Rstd + row), 0.0)
            dy = tl.load(dY + row * width + cols, mask=inside, other=0.0).to(tl.float32)
            wdy = w * dy
            dh = (wdy - xhat * (tl.sum(xhat * wdy, 0) / width) - tl.sum(wdy, 0) / width) * tl.load(Rstd + row)
            dx = dh * factor
            tl.store(dR + row * width + cols, dh.to(dR.dtype.element_ty), mask=inside)
            tl.store(dX + row * width + cols, dx.to(dX.dtype.element_ty), mask=inside)
            part_w += dy * xhat
            part_beta += dy
            part_b += tl.where(inside, dx, 0.0)
        tl.store(PartW + program * width + cols, part_w, mask=inside)
        tl.store(PartBeta + program * width + cols, part_beta, mask=inside)
        tl.store(PartB + program * width + cols, part_b, mask=inside)


_ELEMENTS_PER_PROGRAM = 1024
_MAX_PROGRAMS = 256  # of the add-norm backward: how many partial sums torch adds at the end


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        x = x.contiguous()
        y = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), _ELEMENTS_PER_PROGRAM),)
        _bias_gelu_forward[grid](x, bias, y, x.numel(), x.shape[-1], BLOCK=_ELEMENTS_PER_PROGRAM)
        ctx.save_for_backward(x, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias = ctx.saved_tensors
        dx = torch.empty_like(x)
        grid = (triton.cdiv(x.numel(), _ELEMENTS_PER_PROGRAM),)
        _bias_gelu_backward[grid](x, bias, dy.contiguous(), dx, x.numel(), x.shape[-1], BLOCK=_ELEMENTS_PER_PROGRAM)
        return dx, dx.flatten(0, -2).float().sum(0).to(bias.dtype)


class _BiasDropoutAddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, residual, weight, beta, p: float, eps: float, seed: int):
        x, residual = x.contiguous(), residual.contiguous()
        width = x.shape[-1]
        rows = x.numel() // width
        y = torch.empty_like(x)
        mean = torch.empty(rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        block = triton.next_power_of_2(width)
        _add_norm_forward[(rows,)](x, bias, residual, weight, beta, y, mean, rstd, seed, p, eps, width,
                                   BLOCK=block, DROPOUT=p > 0)
        ctx.save_for_backward(x, bias, residual, weight, mean, rstd)
        ctx.p, ctx.seed = p, seed
        return y

    @staticmethod
    def backward(ctx, dy):
        x, bias, residual, weight, mean, rstd = ctx.saved_tensors
        width = x.shape[-1]
        rows = x.numel() // width
        programs = min(rows, _MAX_PROGRAMS)
        dx, dresidual = torch.empty_like(x), torch.empty_like(residual)
        parts = [torch.empty(programs, width, device=x.device, dtype=torch.float32) for _ in range(3)]
        _add_norm_backward[(programs,)](x, bias, residual, weight, dy.contiguous(), dx, dresidual, mean, rstd, *parts,
                                        ctx.seed, ctx.p, rows, width, programs,
                                        BLOCK=triton.next_power_of_2(width), DROPOUT=ctx.p > 0)
        dweight, dbeta, dbias = (part.sum(0) for part in parts)
        return (dx, dbias.to(bias.dtype), dresidual, dweight.to(weight.dtype), dbeta.to(weight.dtype),
                None, None, None)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias) (erf GELU), bias broadcast over the last dimension."""
    return _BiasGelu.apply(x, bias)


def bias_dropout_add_norm(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          beta: torch.Tensor, p: float, eps: float, seed: int | None = None) -> torch.Tensor:
    """LayerNorm(dropout(x + bias, p) + residual) with LayerNorm `weight`, `beta`, `eps`, over the
    last dimension. `seed`: the dropout draw (default: from torch's generator); the mask is the
    one `fused_attention.dropout_mask(seed, 1, rows, width, p)` gives."""
    return _BiasDropoutAddNorm.apply(x, bias, residual, weight, beta, float(p), float(eps),
                                     draw_seed(p) if seed is None else seed)


def add_norm(x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module,
             dropout: torch.nn.Dropout) -> torch.Tensor:
    """`norm(dropout(x + bias) + residual)` of a sub-layer's modules, in one kernel."""
    p = dropout.p if dropout.training else 0.0
    return bias_dropout_add_norm(x, bias, residual, norm.weight, norm.bias, p, norm.eps)
