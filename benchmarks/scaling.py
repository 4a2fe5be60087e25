"""Weak scaling of ViLBERT pretraining to many GPUs, worked out from a per-GPU rate and stated
link bandwidths: what the gradient all-reduce costs against the compute, with DeepSpeed's
overlap of communication and backward (ZeRO-2 `overlap_comm`, reduce buckets), bf16 gradient
reduction and gradient accumulation; and what the input side must deliver (GB/s of shards
per node, data-worker cores per GPU).

    python benchmarks/scaling.py [--gpu-samples-per-s R | --gpu-tflops 989 --mfu 0.4] \\
        [--node-gbs 100] [--nvlink-gbs 450] [--micro-batch 64] [--global-batch 512] [--bucket 5e7]

The model (per optimizer step, each GPU a micro batch of `--micro-batch` per accumulation step):
  compute    micro x accumulation / rate; the rate from `--gpu-samples-per-s`, else peak x MFU
             / FLOPs per sample (47.4 GFLOP at the paper's shapes, fwd + bwd: model_step.py)
  all-reduce hierarchical (NCCL's ring within and across nodes): 2 (g-1)/g x bytes / NVLink +
             2 (n-1)/n x bytes / the node's network, bytes = parameters x 2 (bf16) or 4 (fp32),
             once per optimizer step (accumulation steps do not communicate), plus 10 us per
             ring hop per bucket
  overlap    buckets are reduced while the last micro batch's backward (2/3 of its compute)
             goes on; what is left of the all-reduce when it ends, at least the last bucket's,
             is exposed
  input      rate x 153,602 bytes per sample (the paper's shape: 36 regions x 2048 float16 +
             boxes + top-32 classes; data_pipeline.py) per GPU, and the rate over the pipeline's
             2,865 samples/s per core (data_pipeline.py, CRC verified)
All the figures below come from the model and the stated inputs; the CPU row is the one
measured point (2 gloo ranks on this machine's 2 cores; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math

BASE_PARAMETERS = 239.0e6  # ViLBERT base (ViLBERTForPretraining, preset base)
FLOPS_PER_SAMPLE = 47.4e9  # forward + backward at 36 tokens + 37 regions (model_step.py)
BYTES_PER_SAMPLE = 153_602  # a paper-shaped shard sample (data_pipeline.py)
PIPELINE_PER_CORE = 2_865  # samples/s of the full input pipeline on one core (data_pipeline.py)
HOP_LATENCY_S = 10e-6
BACKWARD_SHARE = 2 / 3  # of a step's compute that is the backward pass
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


def step_figures(gpus: int, args) -> dict:
    """One optimizer step on `gpus` GPUs (weak scaling: the micro batch per GPU is fixed)."""
    per_node = min(gpus, args.gpus_per_node)
    nodes = math.ceil(gpus / per_node)
    accumulation = max(1, round(args.global_batch / (args.micro_batch * gpus)))
    rate = args.gpu_samples_per_s or args.gpu_tflops * 1e12 * args.mfu / FLOPS_PER_SAMPLE
    micro_s = args.micro_batch / rate
    compute = micro_s * accumulation
    grad_bytes = args.parameters * (2 if args.reduce_dtype == "bf16" else 4)
    buckets = max(1, math.ceil(args.parameters / args.bucket))
    hops = 2 * (per_node - 1) + 2 * (nodes - 1)
    comm = 0.0 if gpus == 1 else (2 * (per_node - 1) / per_node * grad_bytes / (args.nvlink_gbs * 1e9)
                                  + 2 * (nodes - 1) / nodes * grad_bytes / (args.node_gbs * 1e9)
                                  + hops * buckets * HOP_LATENCY_S)
    window = BACKWARD_SHARE * micro_s * (buckets - 1) / buckets if args.overlap else 0.0
    exposed = max(comm - window, comm / buckets) if comm else 0.0
    step = compute + exposed
    return {"gpus": gpus, "nodes": nodes, "accumulation": accumulation,
            "global_batch": args.micro_batch * gpus * accumulation, "compute_ms": compute * 1e3,
            "allreduce_ms": comm * 1e3, "exposed_ms": exposed * 1e3, "efficiency": compute / step,
            "samples_per_s": args.micro_batch * gpus * accumulation / step,
            "input_gbs_per_node": per_node * rate * compute / step * BYTES_PER_SAMPLE / 1e9,
            "cores_per_gpu": math.ceil(rate / PIPELINE_PER_CORE)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-samples-per-s", type=float,
                        help="a measured per-GPU training rate (instead of the next two)")
    parser.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.4, help="the fraction of the peak a GPU is assumed to reach")
    parser.add_argument("--parameters", type=float, default=BASE_PARAMETERS)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--nvlink-gbs", type=float, default=450.0, help="per GPU, one direction (NVLink 4: 450)")
    parser.add_argument("--node-gbs", type=float, default=100.0,
                        help="a node's network, one direction (4 x 200 Gb/s InfiniBand: 100; 8 x 400 Gb/s: 400)")
    parser.add_argument("--micro-batch", type=int, default=64)
    parser.add_argument("--global-batch", type=int, default=512, help="the paper's; grows past it when the GPUs do")
    parser.add_argument("--bucket", type=float, default=5e7, help="reduce_bucket_size (elements)")
    parser.add_argument("--reduce-dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--no-overlap", dest="overlap", action="store_false", help="overlap_comm: false")
    args = parser.parse_args()

    rate = args.gpu_samples_per_s or args.gpu_tflops * 1e12 * args.mfu / FLOPS_PER_SAMPLE
    source = "measured" if args.gpu_samples_per_s else f"{args.mfu:.0%} of {args.gpu_tflops:.0f} TFLOP/s, projected"
    grad_mb = args.parameters * (2 if args.reduce_dtype == "bf16" else 4) / 1e6
    print(f"per GPU: {rate:,.0f} samples/s ({source}); gradients {grad_mb:.0f} MB ({args.reduce_dtype}) in "
          f"{math.ceil(args.parameters / args.bucket)} bucket(s) of {args.bucket:.0e}; NVLink {args.nvlink_gbs:.0f} "
          f"GB/s, node network {args.node_gbs:.0f} GB/s; overlap_comm {args.overlap}")
    print("| GPUs | nodes | accumulation | global batch | compute ms | all-reduce ms | exposed ms | efficiency "
          "| samples/s | input GB/s per node | data cores per GPU |")
    print("|---" * 11 + "|")
    for gpus in GPU_COUNTS:
        f = step_figures(gpus, args)
        print(f"| {f['gpus']} | {f['nodes']} | {f['accumulation']} | {f['global_batch']} | {f['compute_ms']:.1f} | "
              f"{f['allreduce_ms']:.1f} | {f['exposed_ms']:.1f} | {f['efficiency']:.0%} | {f['samples_per_s']:,.0f} | "
              f"{f['input_gbs_per_node']:.2f} | {f['cores_per_gpu']} |")


if __name__ == "__main__":
    main()
