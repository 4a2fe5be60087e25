"""How fast the retrieval evaluation scores (caption, image) pairs, and what the full Flickr30k
test (5,000 captions x 1,000 images = 5M pairs) costs.

The pairs go through what `vilbert evaluate --task retrieval` runs: the task's evaluation
examples (one image against `eval_chunk` captions), its collate (each image once, spread over
its captions' rows on the device) and `ViLBERTForTasks` without gradients, at the paper's
shapes: 100 regions + the IMG token of 2048-d features, captions of 30 tokens at most (here
synthetic ones of 12-16 words, Flickr30k's usual length). Prints pairs/s and GFLOP per pair
(torch's FLOP counter) per device and precision, the 5M pairs' wall time at the measured rate,
and, where no GPU is here, a projection for one: FLOPs / (the GPU's dense bf16 peak x an
assumed fraction of it), marked as projected.

    python benchmarks/retrieval_eval.py [--preset base] [--precisions bf16] [--batch-size 2] [--chunk 50]
        [--gpu-peak-tflops 989] [--gpu-fraction 0.4]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from vilbert import ViLBERTConfig
from vilbert.modeling.vilbert import ViLBERTForTasks
from vilbert.tasks.retrieval import AllCaptions, Retrieval, RetrievalOptions
from vilbert.train.precision import native_bf16

FLICKR_PAIRS = 5000 * 1000
REGIONS, FEATURES = 100, 2048
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class SyntheticSplit:
    """What `AllCaptions` reads of a split (keys and captions), for synthetic images."""

    def __init__(self, images: int, rng: np.random.Generator):
        words = "a man woman dog in on the red blue shirt street with of and two is are sitting playing near".split()
        self.keys = [f"{i}" for i in range(images)]
        self.captions = [[" ".join(rng.choice(words, int(rng.integers(12, 17)))) for _ in range(5)]
                         for _ in range(images)]


def batches(task: Retrieval, count: int, batch: int, rng: np.random.Generator):
    """`count` evaluation batches of `batch` examples, over a split of enough synthetic images."""
    split = SyntheticSplit(max(10, task.options.eval_chunk // 5 + 1), rng)
    examples = []
    for key in split.keys:
        corner = rng.uniform(0, 300, (REGIONS, 2))
        boxes = np.concatenate([corner, corner + rng.uniform(1, 300, (REGIONS, 2))], 1).astype(np.float32)
        sample = {"key": key, "features": rng.random((REGIONS, FEATURES), np.float32).astype(np.float16),
                  "boxes": boxes, "image_w": 600, "image_h": 600}
        examples += AllCaptions(split, 0, task.options.eval_chunk)(sample)
        if len(examples) >= count * batch:
            break
    return [task.collate(examples[i * batch:(i + 1) * batch]) for i in range(count)]


def measure(preset: str, device: str, dtype: torch.dtype, batch: int, chunk: int, repeats: int):
    """(pairs/s, GFLOP per pair) of the evaluation's forward passes."""
    config = ViLBERTConfig.from_preset(preset, v_feature_size=FEATURES)
    model = ViLBERTForTasks(config).to(device, dtype).eval()
    task = Retrieval(RetrievalOptions(eval_chunk=chunk), index=None)
    work = batches(task, repeats + 1, batch, np.random.default_rng(0))
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:  # also the warm-up
            task.predict(model(**work[0].to(device).model_inputs(dtype)), work[0])
        if device == "cuda":
            torch.cuda.synchronize()
        start, pairs = time.perf_counter(), 0
        for b in work[1:]:
            task.predict(model(**b.to(device).model_inputs(dtype)), b).cpu()
            pairs += len(b) * chunk
        seconds = time.perf_counter() - start
    return pairs / seconds, counter.get_total_flops() / (len(work[0]) * chunk) / 1e9


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--precisions", nargs="+", default=["bf16"], choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=2, help="images per batch on CPU (each x --chunk pairs)")
    parser.add_argument("--gpu-batch-size", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=50, help="captions per image per example (task.eval_chunk)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches")
    parser.add_argument("--gpu-peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--gpu-fraction", type=float, default=0.4, help="of the peak a GPU is assumed to reach")
    args = parser.parse_args()

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, native bf16 on CPU: {native_bf16('cpu')}"
          + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in devices else ", no GPU"))
    print(f"{args.preset}: {REGIONS} regions + IMG of {FEATURES}-d features, captions of 12-16 words, "
          f"{args.chunk} captions per image per example; forward only")
    print("| device | precision | pairs per batch | pairs/s | GFLOP/pair | 5M pairs (Flickr30k test) |")
    print("|---|---|---|---|---|---|")
    gflop = None
    for device in devices:
        batch = args.batch_size if device == "cpu" else args.gpu_batch_size
        for precision in args.precisions:
            dtype = DTYPES[precision]
            if dtype == torch.bfloat16 and not native_bf16(device):
                print(f"| {device} | bf16 | - | not run: no native bf16 here | - | - |")
                continue
            rate, gflop = measure(args.preset, device, dtype, batch, args.chunk, args.repeats)
            print(f"| {device} | {precision} | {batch * args.chunk} | {rate:.1f} | {gflop:.1f} | "
                  f"{hours(FLICKR_PAIRS / rate)} measured rate |", flush=True)
    if "cuda" not in devices and gflop is not None:
        rate = args.gpu_peak_tflops * 1e3 * args.gpu_fraction / gflop
        print(f"| GPU (projected, not measured) | bf16 | - | {rate:.0f} | {gflop:.1f} | {hours(FLICKR_PAIRS / rate)} "
              f"at {args.gpu_fraction:.0%} of {args.gpu_peak_tflops:.0f} TFLOP/s |")


if __name__ == "__main__":
    main()
