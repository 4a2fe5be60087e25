"""Does toy-world pretraining transfer to each fine-tuning task? For every task and seed, the
same fine-tuning (the task's `configs/toy_<task>.yaml`) from a pretrained toy model and from
the no-pretraining baseline (text stream from BERT, the rest fresh):

    python benchmarks/task_transfer.py --models 0=PRETRAINED_0 1=PRETRAINED_1 2=PRETRAINED_2 \\
        [--tasks refcoco vcr vqa] [--out runs/task_transfer] [--finetune optim.steps=600 ...]
    python benchmarks/task_transfer.py --table [--out runs/task_transfer]

PRETRAINED_<seed>: a pretrained toy model (`save_pretrained` directory, e.g. runs/toy/model
of `make demo`, or a pretraining cell of the toy ablation grid) fine-tuned with that seed.
Retrieval also evaluates each pretrained model as it is (zero-shot: the alignment head's
P(aligned)) on the same validation images as the fine-tuned models. Each run's best
validation metric is appended to <out>/results.jsonl as it comes; a rerun skips what is
there. The task shards (`python -m shards toy<task>`, the Makefile's sizes) are written
first if missing. `--table` prints, per task, the metric with and without pretraining (mean
± spread over seeds) and the gain, and zero-shot retrieval against chance.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from vilbert.tasks.retrieval import rank_metrics

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import ROOT, run, spread  # noqa: E402  (the transfer benchmark's runner and formatting)

INITS = ("pretrained", "none")
ZERO_SHOT = "zero-shot"  # the pretrained model without fine-tuning (retrieval only)


def task_config(task: str) -> dict:
    return yaml.safe_load((ROOT / f"configs/toy_{task}.yaml").read_text())


def write_data(task: str, out: Path) -> None:
    shards = Path(task_config(task)["data"]["shards"]).parent
    if not (ROOT / shards / "train/index.json").exists():
        run(["-m", "shards", f"toy{task}", "--out", str(shards), "--images", "4000", "--val-images", "500",
             "--feature-dim", "256"], out / "logs" / f"data-{task}.log")


def best_metric(run_dir: Path) -> tuple[str, float]:
    """The best validation metric the run kept (`val/best_<metric>`)."""
    best = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        best.update({k: v for k, v in json.loads(line).items() if k.startswith("val/best_") and k != "val/best_step"})
    (name, value), = best.items()
    return name, value


def table(results: list[dict]) -> str:
    lines = ["| task | metric | pretrained | no pretraining | gain | seeds |", "|---|---|---|---|---|---|"]
    for task in sorted({r["task"] for r in results}):
        by = {init: {r["seed"]: r["value"] for r in results if r["task"] == task and r["init"] == init}
              for init in INITS}
        seeds = sorted(set(by["pretrained"]) & set(by["none"]))
        gains = [by["pretrained"][s] - by["none"][s] for s in seeds]
        metric = next(r["metric"] for r in results if r["task"] == task and r["init"] in INITS)
        shown = [spread(list(by[init].values())) if by[init] else "-" for init in INITS]
        gain = spread(gains, signed=True) if gains else "-"
        lines.append(f"| {task} | {metric} | {shown[0]} | {shown[1]} | {gain} | {len(seeds)} |")
    zero_shot = [r for r in results if r["init"] == ZERO_SHOT]
    if zero_shot:
        lines += ["", "| zero-shot | metric | pretrained, not fine-tuned | chance | seeds |", "|---|---|---|---|---|"]
        for metric in ("r1", "r5", "r10"):
            values = [r["metrics"][metric] for r in zero_shot]
            chance = min(int(metric[1:]) / zero_shot[0]["metrics"]["images"], 1)
            lines.append(f"| retrieval | {metric} | {spread(values)} | {chance:.3f} | {len(values)} |")
    return "\n".join(lines)


def zero_shot(model: str, seed: int, out: Path) -> dict:
    """Zero-shot retrieval of a pretrained model on the toy retrieval validation images."""
    config = task_config("retrieval")
    results = out / "retrieval" / f"zero-shot-s{seed}.json"
    start = time.time()
    run(["-m", "vilbert", "evaluate", "--task", "retrieval", "--zero-shot", "--checkpoint", model, "--split",
         config["eval"]["shards"], "--max-images", str(config["task"]["max_images"]), "--out", str(results),
         "tracking.enabled=false"], out / "logs" / f"retrieval-{ZERO_SHOT}-s{seed}.log")
    captions = json.loads(results.read_text())
    metrics = rank_metrics([c["above"] for c in captions], [c["tied"] for c in captions])
    images = len({c["image"] for c in captions})
    return {"task": "retrieval", "seed": seed, "init": ZERO_SHOT, "metric": "val/r1", "value": metrics["r1"],
            "metrics": {**metrics, "images": images}, "model": model, "minutes": (time.time() - start) / 60,
            "overrides": []}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], metavar="SEED=DIR", help="a pretrained model per seed")
    parser.add_argument("--tasks", nargs="+", default=["refcoco", "vcr"])
    parser.add_argument("--out", type=Path, default=Path("runs/task_transfer"))
    parser.add_argument("--finetune", nargs="*", default=[], help="overrides for every fine-tune")
    parser.add_argument("--table", action="store_true", help="print the table of what is there and stop")
    args = parser.parse_args()
    out = args.out if args.out.is_absolute() else ROOT / args.out
    results_file = out / "results.jsonl"
    results = [json.loads(line) for line in results_file.read_text().splitlines()] if results_file.exists() else []
    if args.table:
        print(table(results))
        return 0
    models = dict(item.split("=", 1) for item in args.models)
    if not models:
        parser.error("--models SEED=DIR ...: a pretrained toy model per seed")
    done = {(r["task"], r["seed"], r["init"]) for r in results}
    out.mkdir(parents=True, exist_ok=True)
    for seed, model in sorted((int(s), m) for s, m in models.items()):  # seed by seed: partial results stay paired
        for task in args.tasks:
            write_data(task, out)
            if task == "retrieval" and (task, seed, ZERO_SHOT) not in done:
                record = zero_shot(model, seed, out)
                with results_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                results.append(record)
                print(f"retrieval seed {seed} zero-shot: R@1 {record['value']:.3f}", flush=True)
            for init in INITS:
                if (task, seed, init) in done:
                    continue
                run_dir = out / task / f"{init}-s{seed}"
                start = time.time()
                run(["-m", "vilbert", "finetune", "--task", task, "--config", f"configs/toy_{task}.yaml", "--overwrite",
                     f"output_dir={run_dir}", f"model.init={model if init == 'pretrained' else ''}", f"seed={seed}",
                     f"data.seed={seed}", f"tracking.uri=sqlite:///{out / 'mlflow.db'}", *args.finetune],
                    out / "logs" / f"{task}-{init}-s{seed}.log")
                metric, value = best_metric(run_dir)
                record = {"task": task, "seed": seed, "init": init, "metric": metric, "value": value,
                          "model": model if init == "pretrained" else "", "minutes": (time.time() - start) / 60,
                          "overrides": args.finetune}
                with results_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                results.append(record)
                print(f"{task} seed {seed} {init}: {metric} {value:.3f} ({record['minutes']:.1f} min)", flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
