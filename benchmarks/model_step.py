"""Forward+backward throughput of ViLBERT pretraining at the paper's shapes.

36 tokens, 37 regions (IMG token + 36 detector regions), 2048-d features, 1601 detector
classes, 15% of tokens and regions masked. Prints a table of samples/s for each preset
and attention backend, on CPU (fp32) and, when CUDA is present, on GPU (bf16 autocast).

    python benchmarks/model_step.py [--presets base small] [--batch-size 8] [--steps 3]
"""

from __future__ import annotations

import argparse
import time

import torch

from vilbert import ViLBERTConfig, ViLBERTForPretraining
from vilbert.losses import IGNORE_INDEX

TOKENS, REGIONS = 36, 37


def make_batch(config: ViLBERTConfig, batch: int, device: str) -> dict:
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
    return {k: v.to(device) for k, v in inputs.items()}


def samples_per_second(preset: str, backend: str, batch: int, steps: int, device: str) -> float:
    config = ViLBERTConfig.from_preset(preset, attention_backend=backend)
    model = ViLBERTForPretraining(config).to(device).train()
    inputs = make_batch(config, batch, device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up: allocations, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["base", "small"])
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gpu-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"))
    print(f"shapes: {TOKENS} tokens, {REGIONS} regions x 2048 features, 1601 classes; forward+backward")
    print(f"| {'device':<11} | {'preset':<6} | {'attention':<9} | {'batch':>5} | {'samples/s':>9} |")
    print(f"|{'-' * 13}|{'-' * 8}|{'-' * 11}|{'-' * 7}|{'-' * 11}|")
    for device in devices:
        batch = args.batch_size if device == "cpu" else args.gpu_batch_size
        label = "cpu fp32" if device == "cpu" else "cuda bf16"
        for preset in args.presets:
            for backend in args.backends:
                rate = samples_per_second(preset, backend, batch, args.steps, device)
                print(f"| {label:<11} | {preset:<6} | {backend:<9} | {batch:>5} | {rate:>9.1f} |", flush=True)


if __name__ == "__main__":
    main()
