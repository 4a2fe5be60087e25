"""Forward+backward speed of ViLBERT pretraining at the paper's shapes, against the
device's own matmul peak.

36 tokens, 37 regions (IMG token + 36 detector regions), 2048-d features, 1601 detector
classes, 15% of tokens and regions masked. For each device (CPU; GPU when present),
precision (fp32; bf16 = bf16 weights and inputs, as DeepSpeed's bf16 mode runs the model)
and preset, prints samples/s, GFLOP per sample (torch's FLOP counter), the GFLOP/s reached
and their fraction of the peak of a 2048x2048 matmul in the same precision, measured here.

    python benchmarks/model_step.py [--presets base small] [--precisions fp32 bf16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from vilbert import ViLBERTConfig
from vilbert.kernels import choose_kernels
from vilbert.losses import IGNORE_INDEX
from vilbert.model_factory import ModelConfig, build_model
from vilbert.modeling.registry import PRETRAINING
from vilbert.train.host_memory import keep_freed_memory
from vilbert.train.precision import native_bf16

TOKENS, REGIONS = 36, 37
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(dtype: torch.dtype, device: str, size: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of the best of `reps` size x size matmuls."""
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(reps):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def make_batch(config: ViLBERTConfig, batch: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, config.vocab_size, (batch, TOKENS), generator=g)
    masked_tokens = torch.rand(batch, TOKENS, generator=g) < 0.15
    masked_regions = torch.rand(batch, REGIONS, generator=g) < 0.15
    masked_regions[:, 0] = False
    inputs = dict(
        input_ids=input_ids, attention_mask=torch.ones(batch, TOKENS, dtype=torch.long),
        region_features=torch.randn(batch, REGIONS, config.v_feature_size, generator=g),
        region_locations=torch.rand(batch, REGIONS, 5, generator=g),
        region_mask=torch.ones(batch, REGIONS, dtype=torch.long),
        masked_lm_labels=input_ids.masked_fill(~masked_tokens, IGNORE_INDEX), masked_regions=masked_regions,
        region_targets=torch.softmax(torch.randn(batch, REGIONS, config.v_target_size, generator=g), -1),
        alignment_labels=torch.randint(0, 2, (batch,), generator=g))
    return {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}


def measure(preset: str, backend: str, batch: int, steps: int, device: str, dtype: torch.dtype, kernels):
    """(samples/s, GFLOP per sample) of forward + backward. `backend`: an attention backend, or
    "compiled" (sdpa under torch.compile as `model.compile` runs it, compiled before timing);
    `kernels`: model.kernels (apex's, where built)."""
    model_config = ModelConfig(preset=preset, kernels=kernels,
                               overrides={"attention_backend": "sdpa" if backend == "compiled" else backend})
    model, _ = build_model(model_config, PRETRAINING, {}, device_type=device)
    config = model.config
    model = model.to(device, dtype).train()
    inputs = make_batch(config, batch, device, dtype)
    if backend == "compiled":
        model.compile(dynamic=True)
        started = time.perf_counter()
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)
        print(f"(compiling {preset} took {time.perf_counter() - started:.0f} s)", flush=True)

    def step():
        model(**inputs).loss.backward()
        model.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up: allocations, kernel selection
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    return batch * steps / (time.perf_counter() - start), counter.get_total_flops() / batch / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base", "small"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    parser.add_argument("--backends", nargs="+", default=["sdpa"],
                        help="attention: sdpa, eager, fused (Triton; GPU), and/or compiled (sdpa + torch.compile)")
    parser.add_argument("--kernels", default="apex",
                        help="model.kernels: apex (where built, on a GPU), torch, or names joined by commas")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--glibc-defaults", action="store_true",
                        help="leave glibc's memory thresholds as they are (the engine raises them on CPU)")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 where it is only emulated (slow)")
    args = parser.parse_args()

    kept = not args.glibc_defaults and keep_freed_memory()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 on CPU: {native_bf16('cpu')}, "
          f"glibc keeps freed memory: {kept}"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"))
    kernels = args.kernels if args.kernels in ("apex", "torch") else args.kernels.split(",")
    for device in devices:
        print(f"{device}: model.kernels={args.kernels}: {choose_kernels(kernels, device, {'gelu'}, True).describe()}")
    print(f"shapes: {TOKENS} tokens, {REGIONS} regions x 2048 features, 1601 classes; forward+backward")
    print("| device | precision | preset | attention | batch | samples/s | GFLOP/sample | GFLOP/s | matmul peak "
          "| of peak |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for device in devices:
        batch = args.batch_size if device == "cpu" else args.gpu_batch_size
        for precision in args.precisions:
            dtype = DTYPES[precision]
            if dtype == torch.bfloat16 and not native_bf16(device) and not args.force_bf16:
                emulated = matmul_peak(dtype, device, size=512, reps=1)
                print(f"| {device} | bf16 | - | - | - | not run: no native bf16 here (a 512x512 bf16 matmul: "
                      f"{emulated:.1f} GFLOP/s); --force-bf16 runs it |")
                continue
            peak = matmul_peak(dtype, device)
            for preset in args.presets:
                for backend in args.backends:
                    if backend == "fused" and device != "cuda":
                        print(f"| {device} | {precision} | {preset} | fused | - | not run: Triton kernels run on GPUs "
                              "(on CPU only in its interpreter, a correctness check) |")
                        continue
                    rate, gflop = measure(preset, backend, batch, args.steps, device, dtype, kernels)
                    print(f"| {device} | {precision} | {preset} | {backend} | {batch} | {rate:.1f} | {gflop:.1f} | "
                          f"{rate * gflop:.0f} | {peak:.0f} | {rate * gflop / peak:.0%} |", flush=True)


if __name__ == "__main__":
    main()
