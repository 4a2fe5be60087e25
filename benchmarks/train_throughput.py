"""Samples/s of full pretraining steps (data pipeline + model + DeepSpeed optimizer step).

CPU: the `small` preset on toy-world shards, with 1 rank (`python -m vilbert`) and 2 ranks
(`torchrun --nproc_per_node 2`), ZeRO-0 fp32, and 1 rank in bf16 where the CPU has native
bf16 (AMX / AVX512-BF16; elsewhere the row says it was not run). GPU (when CUDA is present): the `base` preset,
bf16, ZeRO-2, the largest micro batch that fits (tried from --gpu-batches), with model
FLOPs utilisation = 6 x parameters x (36 tokens + 37 regions) x samples/s / peak.

    python benchmarks/train_throughput.py [--steps 12] [--gpu-peak-tflops 989]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parent.parent
SEQUENCE = 36 + 37  # tokens + regions per sample at the paper's shapes


def run(command: list[str], output_dir: Path, overrides: list[str]) -> dict:
    result = subprocess.run(command + ["pretrain", *overrides, f"output_dir={output_dir}"], cwd=ROOT,
                            capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if result.returncode != 0:
        return {"error": result.stderr[-2000:]}
    steps = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["train/samples_per_s"] for m in steps if "train/samples_per_s" in m][2:]  # skip warm-up steps
    return {"samples_per_s": statistics.median(rates), "data_wait": statistics.median(
        m["train/data_wait_fraction"] for m in steps if "train/data_wait_fraction" in m),
        "peak_gb": max((m.get("system/gpu_peak_memory_gb", 0.0) for m in steps), default=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cpu-batch", type=int, default=16, help="micro batch per rank on CPU")
    parser.add_argument("--gpu-batches", type=int, nargs="+", default=[256, 192, 128, 96, 64, 32])
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args()

    import torch

    from shards.toyworld import write_toyworld
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_toyworld(tmp / "toy", 4000, 0, feature_dim=2048, workers=2)
        common = [f"data.shards={tmp / 'toy' / 'train'}", f"optim.steps={args.steps}",
                  "tracking.enabled=false", "tracking.log_every=1", f"checkpoint.every_steps={10 ** 9}",
                  "model.bert=minilm"]
        print("| device | preset | ranks | precision / ZeRO | micro batch | samples/s | data wait | MFU | peak GB |")
        print("|---|---|---|---|---|---|---|---|---|")
        from vilbert.train.precision import native_bf16

        for ranks, precision in ((1, "fp32"), (2, "fp32"), (1, "bf16")):
            if precision == "bf16" and not native_bf16("cpu"):
                print(f"| cpu ({os.cpu_count()} cores) | small | 1 | bf16 / 0 | {args.cpu_batch} | not run: this CPU "
                      "has no native bf16 (AMX / AVX512-BF16) | - | - | - |")
                continue
            command = [sys.executable, "-m", "vilbert"] if ranks == 1 else \
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "vilbert"]
            result = run(command, tmp / f"cpu{ranks}{precision}", common + [
                "model.preset=small", f"data.batch_size={args.cpu_batch}", "data.workers=0",
                f"optim.global_batch_size={args.cpu_batch * ranks}",
                f"deepspeed=deepspeed_configs/zero0_{precision}.json"])
            if "error" in result:
                print(f"cpu, {ranks} ranks, {precision} failed:\n{result['error']}")
                continue
            print(f"| cpu ({os.cpu_count()} cores) | small | {ranks} | {precision} / 0 | {args.cpu_batch} | "
                  f"{result['samples_per_s']:.1f} | {result['data_wait']:.0%} | - | - |", flush=True)
        if not torch.cuda.is_available():
            print("no GPU: GPU figures not measured")
            return
        from vilbert import ViLBERTConfig, ViLBERTForPretraining

        parameters = sum(p.numel() for p in ViLBERTForPretraining(ViLBERTConfig.from_preset("base")).parameters())
        for batch in args.gpu_batches:
            result = run([sys.executable, "-m", "vilbert"], tmp / f"gpu{batch}", common + [
                "model.preset=base", "model.bert=null", f"data.batch_size={batch}", "data.workers=6",
                f"optim.global_batch_size={batch}", "deepspeed=deepspeed_configs/zero2_bf16.json"])
            if "error" in result:
                continue  # out of memory: try a smaller micro batch
            mfu = 6 * parameters * SEQUENCE * result["samples_per_s"] / (args.gpu_peak_tflops * 1e12)
            print(f"| {torch.cuda.get_device_name()} | base | 1 | bf16 / 2 | {batch} | "
                  f"{result['samples_per_s']:.1f} | {result['data_wait']:.0%} | {mfu:.1%} | "
                  f"{result['peak_gb']:.1f} |")
            break


if __name__ == "__main__":
    main()
