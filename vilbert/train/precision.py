"""Which float type a run trains in: the DeepSpeed file asks, the hardware decides.

bf16 is fast only where the hardware multiplies in it: GPUs since Ampere, and CPUs with AMX
or AVX512-BF16. Elsewhere (e.g. AVX2-only CPUs) oneDNN emulates it and a bf16 matmul runs
10-150x slower than fp32, so a bf16 request there trains in fp32 instead, and says so.

In bf16, DeepSpeed keeps the model's weights and activations in bf16 and fp32 master weights
and Adam state in its optimizer wrapper; on CPU that path keeps every matmul in bf16 without
the per-op casts of autocast.
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger(__name__)


def native_bf16(device_type: str) -> bool:
    """Whether `device_type` ("cpu" or "cuda") computes matmuls in bf16 natively."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in
               ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def float_dtype(ds_config: dict) -> torch.dtype:
    """The dtype DeepSpeed gives the model's weights and inputs under `ds_config`."""
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def resolve_precision(ds_config: dict, device_type: str, fallback: bool = True) -> dict:
    """`ds_config` with bf16 switched off where the device has no native bf16 (unless
    `fallback` is false); logs the precision the run trains in."""
    wanted = float_dtype(ds_config)
    if wanted == torch.bfloat16 and not native_bf16(device_type):
        if fallback:
            ds_config = copy.deepcopy(ds_config)
            ds_config["bf16"]["enabled"] = False
            log.warning("precision: fp32 (bf16 asked, but this %s has no native bf16 (AMX/AVX512-BF16 on CPU): "
                        "emulated bf16 would be slower; set bf16_fallback=false to train in bf16 anyway)",
                        device_type)
            return ds_config
        log.warning("precision: bf16 on a %s without native bf16 (bf16_fallback=false): expect slow matmuls",
                    device_type)
        return ds_config
    log.info("precision: %s on %s", str(wanted).removeprefix("torch."), device_type)
    return ds_config
