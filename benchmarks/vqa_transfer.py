"""Does pretraining transfer? Toy VQA accuracy after the same fine-tuning budget, starting from
(a) a pretrained model and (b) the paper's no-pretraining baseline (text stream from BERT,
the rest fresh), over seeds.

    python benchmarks/vqa_transfer.py [--seeds 0 1] [--pretrained runs/toy/model] [key=value ...]

Needs the toy VQA shards (`make toy-vqa`) and a pretrained model (`make demo`). Every run is
`vilbert finetune --task vqa --config configs/toy_vqa.yaml` into runs/transfer/<start>-s<seed>
with the overrides given; the figure of a run is its best validation accuracy (the official
VQA metric), overall and per answer type.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def best_evaluation(run: Path) -> dict[str, float]:
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [m for m in logged if "val/accuracy" in m]
    return max(evaluations, key=lambda m: m["val/accuracy"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--pretrained", default="runs/toy/model")
    parser.add_argument("--config", default="configs/toy_vqa.yaml")
    parser.add_argument("--out", default="runs/transfer")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every run, e.g. optim.steps=600")
    args = parser.parse_args()
    starts = {"pretrained": f"model.init={args.pretrained}", "no-pretraining": "model.init="}
    rows = []
    for seed in args.seeds:
        for start, init in starts.items():
            run = ROOT / args.out / f"{start}-s{seed}"
            began = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "vilbert", "finetune", "--task", "vqa", "--config",
                                   args.config, "--overwrite", f"output_dir={run}", f"seed={seed}", f"data.seed={seed}",
                                   init, "tracking.experiment=toy-vqa-transfer", *args.overrides],
                                  cwd=ROOT, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return done.returncode
            best = best_evaluation(run)
            rows.append((start, seed, best, time.perf_counter() - began))
            print(f"{start} seed {seed}: accuracy {best['val/accuracy']:.3f} at step {best['step']} "
                  f"({rows[-1][3]:.0f} s)", flush=True)
    types = sorted(k for k in rows[0][2] if k.startswith("val/accuracy/"))
    print("\n| start | seed | accuracy | " + " | ".join(t.removeprefix("val/accuracy/") for t in types) + " | step |")
    print("|---|---|---|" + "---|" * len(types) + "---|")
    for start, seed, best, _ in rows:
        print(f"| {start} | {seed} | {best['val/accuracy']:.3f} | "
              + " | ".join(f"{best[t]:.3f}" for t in types) + f" | {best['step']} |")
    for start in starts:
        values = [best["val/accuracy"] for s, _, best, _ in rows if s == start]
        print(f"{start}: mean accuracy {sum(values) / len(values):.3f} over seeds {args.seeds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
