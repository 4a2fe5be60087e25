"""NVIDIA apex's fused kernels a run may use (`model.kernels`), in one table.

apex is built from source on GPU clusters; the package called `apex` on the package index is an
unrelated web toolkit and is never installed. apex removed its fused multi-head attention in July
2026, so attention is ours (`attention_backend: fused`). What a ViLBERT layer can still take from
apex is below. Each replaces torch's op with the same parameters (state dicts interchange) and
the same math; a kernel whose math differs from the model's is not used.

`model.kernels`:
  - `apex` (default): each kernel below that is importable and applies to the run. One log line
    and the MLflow parameter `model.kernels_used` say which it uses and why not the others.
  - `torch`: none of them.
  - a list of names, e.g. `[fused_layer_norm, xentropy]`: exactly these; one that cannot be used
    is a one-line error saying what to build.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

BUILD_APEX = ("build NVIDIA apex from source with its C++ and CUDA extensions (pip install -v --no-build-isolation "
              "--config-settings \"--build-option=--cpp_ext\" --config-settings \"--build-option=--cuda_ext\"{extra} "
              "./apex in a clone of github.com/NVIDIA/apex; the package index's `apex` is another project)")


@dataclass(frozen=True)
class Kernel:
    module: str
    attribute: str
    replaces: str
    build_option: str = ""  # an apex build option beyond --cpp_ext --cuda_ext


KERNELS = {
    "fused_layer_norm": Kernel("apex.normalization", "FusedLayerNorm", "every LayerNorm"),
    "fused_dense": Kernel("apex.fused_dense", "fused_dense_gelu_dense_function",
                          "the feed-forward's GEMM + bias + GELU + GEMM + bias"),
    "xentropy": Kernel("apex.contrib.xentropy", "SoftmaxCrossEntropyLoss", "the masked-LM softmax cross-entropy",
                       "--xentropy"),
    "fused_adam": Kernel("apex.optimizers", "FusedAdam", "torch's AdamW"),
}
# cuBLASLt's GELU epilogue, which fused_dense uses, is the tanh approximation of GELU.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


@functools.cache  # a failed import is not cached by Python, and every LayerNorm asks
def load(name: str):
    """The apex object behind kernel `name`, or None where it is not importable."""
    kernel = KERNELS[name]
    try:
        return getattr(importlib.import_module(kernel.module), kernel.attribute)
    except (ImportError, AttributeError):  # apex not built, built without the option, or the unrelated package
        return None


@dataclass(frozen=True)
class KernelChoice:
    used: tuple[str, ...]
    not_used: dict[str, str]  # name -> why not

    def describe(self) -> str:
        """The one log line."""
        used = ", ".join(f"{name} ({KERNELS[name].module})" for name in self.used) or "none"
        why_not = "; ".join(f"{name}: {why}" for name, why in self.not_used.items())
        return f"apex kernels used: {used}" + (f". Not used: {why_not}" if why_not else "")


def _why_not(name: str, device_type: str, hidden_acts: set[str], masked_lm: bool) -> str | None:
    """Why kernel `name` cannot serve this run (None: it can)."""
    if device_type != "cuda":
        return "apex's kernels run on GPUs"
    if name == "fused_dense" and not hidden_acts <= set(TANH_GELU):
        return (f"its GELU is the tanh approximation and the model's activation is {'/'.join(sorted(hidden_acts))} "
                "(hidden_act gelu_new would use it)")
    if name == "xentropy" and not masked_lm:
        return "the run has no masked-LM loss"
    if load(name) is None:
        return f"{KERNELS[name].module}.{KERNELS[name].attribute} is not importable: " + \
            BUILD_APEX.format(extra=f" --config-settings \"--build-option={KERNELS[name].build_option}\""
                              if KERNELS[name].build_option else "")
    return None


def choose_kernels(spec: str | list[str], device_type: str, hidden_acts: set[str], masked_lm: bool) -> KernelChoice:
    """Resolve `model.kernels` for a run on `device_type` whose streams use `hidden_acts`.
    Raises ValueError for an unknown name, or a named kernel that cannot be used."""
    if spec == "torch":
        return KernelChoice((), {name: "model.kernels=torch" for name in KERNELS})
    if spec == "apex":
        names, required = list(KERNELS), False
    elif isinstance(spec, (list, tuple)):
        unknown = [name for name in spec if name not in KERNELS]
        if unknown:
            raise ValueError(f"model.kernels: {', '.join(map(str, unknown))} is not a kernel; choose from "
                             f"{', '.join(KERNELS)} (or write apex / torch)")
        names, required = list(spec), True
    else:
        raise ValueError(f"model.kernels={spec!r}: write apex, torch or a list of {', '.join(KERNELS)}")
    used, not_used = [], {}
    for name in names:
        why = _why_not(name, device_type, hidden_acts, masked_lm)
        if why is None:
            used.append(name)
        elif required:
            raise ValueError(f"model.kernels asks for {name} ({KERNELS[name].replaces}), but {why}")
        else:
            not_used[name] = why
    return KernelChoice(tuple(used), not_used)
