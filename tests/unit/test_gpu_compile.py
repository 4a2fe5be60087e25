"""The fused backend's Triton kernels compile for real GPUs, on this CPU-only machine.

The other fused tests run the kernels in Triton's interpreter, which never compiles them:
`tests/support/compile_kernels.py` records the launches the fused attention and tails make
(bf16 with dropout and fp32 without, at head sizes 64 and 128) and compiles each with Triton's
CUDA backend, checking shared memory against the target's limit. Targets: sm_86 (99 kB of
shared memory per block: RTX 30xx/40xx, A10, L4; sm_89 has the same) and sm_90 (H100/H200)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="triton is not installed: pip install triton")
pytest.importorskip("triton.backends.nvidia", reason="this triton build has no CUDA backend to compile with")

SCRIPT = Path(__file__).parent.parent / "support" / "compile_kernels.py"
KERNELS = {"_forward", "_backward_keys", "_backward_queries", "_mask", "_bias_gelu_forward", "_bias_gelu_backward",
           "_add_norm_forward", "_add_norm_backward"}


def test_every_fused_kernel_compiles_for_sm86_and_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = [subprocess.Popen([sys.executable, str(SCRIPT), "--targets", target], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for target in ("86", "90")]  # 2 cores
    for run, target in zip(runs, ("86", "90")):
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, out[-3000:] + err[-3000:]
        lines = out.splitlines()
        assert {line.split()[0] for line in lines} == KERNELS, out
        assert all(f" sm_{target}: " in line for line in lines)
        # 4 variants of each attention kernel (dtype x head size: 4 block shapes), 2 of each tail, 1 mask
        assert len(lines) == 4 * 3 + 2 * 4 + 1, out
