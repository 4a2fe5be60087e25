"""Compile every Triton kernel of the fused backend for real GPUs, on a machine without one.

Triton's interpreter (how the tests run the kernels on CPU) executes them as Python: it never
types, lowers or register-allocates them, so a kernel can pass every interpreted test and fail
to compile on a GPU. This script records the launches the fused attention and the fused tails
make (forward and backward; bf16 with dropout, fp32 without) with the kernels swapped for
recorders, then compiles each launch ahead of time with Triton's CUDA backend (ptxas is in
the triton wheel) for each target, and checks its shared memory against the target's limit.

    python tests/support/compile_kernels.py [--targets 80 90]

Prints one line per kernel variant and target; exits 1 on the first failure. Must run without
TRITON_INTERPRET (the kernels must be compiled functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# (dtype, dropout, head size): training in bf16 and checking in fp32, at the paper's head sizes
# (text 768 / 12 = 64; regions and co-attention 1024 / 8 = 128)
VARIANTS = [(dtype, p, head_dim) for dtype, p in ((torch.bfloat16, 0.1), (torch.float32, 0.0))
            for head_dim in (64, 128)]


class Recorder:
    """Stands in for a kernel: `kernel[grid](*args, **constexprs)` records the launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        return lambda *args, **constexprs: self.launches.append((self.kernel, args, constexprs))


def signature(kernel, args: tuple, constexprs: dict) -> dict[str, str]:
    """Triton's type string of each argument, as a launch with these values would specialise it."""
    runtime = [p.name for p in kernel.params if not p.is_constexpr]
    assert len(runtime) == len(args), f"{kernel.fn.__name__}: {len(args)} arguments for {len(runtime)} parameters"
    types = {}
    for name, value in zip(runtime, args):
        if isinstance(value, torch.Tensor):
            types[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            types[name] = "fp32"
    return {**types, **{name: "constexpr" for name in constexprs}}


def resources(cubin: bytes) -> str:
    """Registers per thread and spilled bytes (local memory) of a compiled kernel, from cuobjdump
    (in the triton wheel): spills are no error, but a slow kernel."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", file.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", usage)
    return f"{found[1]} registers, {found[3]} bytes spilled" if found else "registers unknown (cuobjdump)"


def record_launches() -> list:
    from vilbert.modeling import fused_attention, fused_tails

    launches = []
    kernels = {fused_attention: ("_forward", "_backward_keys", "_backward_queries", "_mask"),
               fused_tails: ("_bias_gelu_forward", "_bias_gelu_backward", "_add_norm_forward", "_add_norm_backward")}
    for module, names in kernels.items():
        for name in names:
            setattr(module, name, Recorder(getattr(module, name), launches))
    fused_attention.check_available = lambda device: None  # CPU tensors only carry shapes and dtypes here
    for dtype, p, head_dim in VARIANTS:
        b, h, text, regions, width = 2, 2, 20, 37, 768
        q, k, v = (torch.zeros(b, h, n, head_dim, dtype=dtype, requires_grad=True) for n in (text, regions, regions))
        q2, k2, v2 = (torch.zeros(b, h, n, head_dim, dtype=dtype, requires_grad=True) for n in (regions, text, text))
        outs = fused_attention.fused_co_attention((q, k, v, torch.zeros(b, regions), p),
                                                  (q2, k2, v2, torch.zeros(b, text), p))
        torch.autograd.backward(outs, [torch.zeros_like(out) for out in outs])
        x = torch.zeros(b, text, width, dtype=dtype, requires_grad=True)
        bias = torch.zeros(width, dtype=dtype, requires_grad=True)
        weight, beta = (torch.zeros(width, dtype=dtype, requires_grad=True) for _ in range(2))
        fused_tails.bias_gelu(x, bias).sum().backward()
        fused_tails.bias_dropout_add_norm(x, bias, torch.zeros_like(x), weight, beta, p, 1e-12).sum().backward()
    fused_attention.dropout_mask(1, b * h, text, regions, 0.1, "cpu")
    return launches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("compile_kernels.py: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    seen = set()
    for kernel, launch_args, constexprs in record_launches():
        types = signature(kernel, launch_args, constexprs)
        key = (kernel.fn.__name__, tuple(types.values()), tuple(constexprs.items()))
        if key in seen:
            continue
        seen.add(key)
        variant = ",".join(f"{k}={v}" for k, v in constexprs.items())
        for capability in args.targets:
            started = time.perf_counter()
            try:
                compiled = triton.compile(ASTSource(kernel, types, constexprs),
                                          target=GPUTarget("cuda", capability, 32))
            except Exception as e:  # noqa: BLE001 - any compiler error is the finding
                print(f"FAILED {kernel.fn.__name__} [{variant}] sm_{capability}: {type(e).__name__}: {e}")
                return 1
            shared = compiled.metadata.shared
            limit = SHARED_MEMORY_LIMIT.get(capability, 48 * 1024)
            dtype = next(t for t in types.values() if t.startswith("*"))[1:]
            print(f"{kernel.fn.__name__} [{variant}] {dtype} sm_{capability}: {shared} bytes shared (limit {limit}), "
                  f"{resources(compiled.asm['cubin'])}, {time.perf_counter() - started:.1f} s")
            if shared > limit:
                print(f"FAILED {kernel.fn.__name__} [{variant}] sm_{capability}: needs {shared} bytes of shared memory")
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
