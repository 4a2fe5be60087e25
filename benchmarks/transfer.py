"""Does pretraining ground words in regions, and does that transfer? The toy-world claim,
measured end to end with the project's own commands:

    pretrain (configs/toy.yaml) -> grounding probe + zero-shot retrieval + held-out alignment
    -> fine-tune on toy VQA (configs/toy_vqa.yaml) from the pretrained model and from the
       no-pretraining baseline (text stream from BERT, the rest fresh), per seed
    -> the budget curve: the transfer gain against the pretraining samples (0 = no pretraining)

    python benchmarks/transfer.py [--seeds 0 1 2] [--budgets 3000 10000 64000] [--budget-seeds 0 1 2]
                                  [--out runs/transfer]
                                  [--finetune optim.steps=600 ...]

Every run's figures are appended to <out>/results.jsonl as they come; a rerun skips what is
there, so a long benchmark can run in the background and be resumed. `--table` prints the
tables of what is there without running anything. The toy world and the toy VQA shards
(the recipe's world: `python -m shards toyworld` / `toyvqa` defaults) are written first if
missing. Per question kind, VQA accuracy comes from `vilbert evaluate`'s predictions; the
"floor" is the best constant answer's score on that kind.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from statistics import mean, pstdev

import yaml

from shards.toyvqa import KINDS

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN, FINETUNE = "configs/toy.yaml", "configs/toy_vqa.yaml"


def run(args: list[str], log: Path) -> None:
    """A project command; its output goes to `log` (appended: a resumed run keeps its first part),
    and a failure stops the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(args)}\n{log.read_text()[-3000:]}")


def last_metrics(run_dir: Path, prefix: str = "val/") -> dict[str, float]:
    """The last logged value of every metric that starts with `prefix`."""
    found = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        found.update({k: v for k, v in json.loads(line).items() if k.startswith(prefix)})
    return found


def write_data(pretrain: dict, finetune: dict) -> None:
    world, vqa = Path(pretrain["data"]["shards"]).parent, Path(finetune["data"]["shards"]).parent
    if not (ROOT / world / "train/index.json").exists():
        run(["-m", "shards", "toyworld", "--out", str(world), "--images", "20000", "--val-images", "1000",
             "--feature-dim", "256"], ROOT / "runs/transfer-logs/toyworld.log")
    if not (ROOT / vqa / "train/index.json").exists():
        run(["-m", "shards", "toyvqa", "--out", str(vqa), "--images", "4000", "--val-images", "500",
             "--feature-dim", "256"], ROOT / "runs/transfer-logs/toyvqa.log")


def per_kind(run_dir: Path, val_shards: Path) -> dict[str, float]:
    """VQA accuracy per question kind of the run's best model, and each kind's floor."""
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples
    from vilbert.tasks.vqa import normalise_answer, vqa_accuracy

    predictions = {r["question_id"]: r["answer"] for r in json.loads((run_dir / "results-val.json").read_text())}
    questions = [q for shard in ShardIndex.read(val_shards).shards
                 for _, s, _ in read_checked_samples(str(val_shards / shard.name)) if s is not None
                 for q in s["meta"]["questions"]]
    figures = {}
    for kind in KINDS:
        asked = [q for q in questions if q["question_type"] == kind]
        if not asked:
            continue
        figures[f"kind/{kind}"] = mean(vqa_accuracy(q["answers"], predictions[q["question_id"]]) for q in asked)
        constants = {normalise_answer(a) for q in asked for a in q["answers"]}
        figures[f"floor/{kind}"] = max(mean(vqa_accuracy(q["answers"], a) for q in asked) for a in constants)
    return figures


class Benchmark:
    def __init__(self, out: Path, overrides: list[str], finetune_overrides: list[str] = ()):
        self.out, self.overrides, self.finetune_overrides = ROOT / out, overrides, list(finetune_overrides)
        self.results_path = self.out / "results.jsonl"
        self.results = [json.loads(line) for line in self.results_path.read_text().splitlines()] \
            if self.results_path.exists() else []

    def done(self, name: str) -> dict | None:
        return next((r for r in self.results if r["name"] == name), None)

    def record(self, row: dict) -> dict:
        self.results.append(row)
        self.out.mkdir(parents=True, exist_ok=True)
        with self.results_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{row['name']}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                             if isinstance(v, float) and "/" not in k[5:]), flush=True)
        return row

    def pretrain(self, seed: int, samples: int | None = None) -> dict:
        """The recipe's pretraining (or `samples` of it, on a schedule fitted to that many)."""
        name = f"pretrain-s{seed}" + (f"-n{samples}" if samples else "")
        if (row := self.done(name)) is not None:
            return row
        run_dir = self.out / name
        steps = [f"optim.steps={samples // pretrain_config()['optim']['global_batch_size']}",
                 "eval.every_steps=0"] if samples else []
        began = time.perf_counter()
        start = resume_or_overwrite(run_dir)
        run(["-m", "vilbert", "pretrain", "--config", PRETRAIN, *start, f"output_dir={run_dir}",
             f"seed={seed}", f"data.seed={seed}", "tracking.experiment=toy-transfer", "eval.retrieval_queries=100",
             *steps, *self.overrides],
            run_dir.with_suffix(".log"))
        return self.record({"name": name, "seed": seed, "samples": samples or None, "model": str(run_dir / "model"),
                            "seconds": time.perf_counter() - began, "resumed": start != ["--overwrite"],
                            **last_metrics(run_dir)})

    def finetune(self, seed: int, start_name: str, init: str) -> dict:
        name = f"vqa-{start_name}-s{seed}"
        if (row := self.done(name)) is not None:
            return row
        run_dir = self.out / name
        began = time.perf_counter()
        start = resume_or_overwrite(run_dir)
        run(["-m", "vilbert", "finetune", "--task", "vqa", "--config", FINETUNE, *start,
             f"output_dir={run_dir}", f"seed={seed}", f"data.seed={seed}", f"model.init={init}",
             "tracking.experiment=toy-transfer", *self.finetune_overrides], run_dir.with_suffix(".log"))
        seconds = time.perf_counter() - began
        run(["-m", "vilbert", "evaluate", "--task", "vqa", "--checkpoint", str(run_dir), "--split", "val"],
            run_dir.with_suffix(".eval.log"))
        best = last_metrics(run_dir, "val/best_")
        val_shards = ROOT / finetune_config()["eval"]["shards"]
        return self.record({"name": name, "seed": seed, "start": start_name, "seconds": seconds,
                            "resumed": start != ["--overwrite"],
                            "accuracy": best["val/best_accuracy"], "step": best["val/best_step"],
                            **per_kind(run_dir, val_shards)})


def resume_or_overwrite(run_dir: Path) -> list[str]:
    """A run stopped part way (a killed benchmark) continues from its checkpoint; any other
    leftover is started again. `seconds` then counts only the resumed part."""
    stopped = (run_dir / "checkpoints/latest").exists() and not (run_dir / "model").exists()
    return ["--resume", "auto"] if stopped else ["--overwrite"]


def pretrain_config() -> dict:
    return yaml.safe_load((ROOT / PRETRAIN).read_text())


def finetune_config() -> dict:
    return yaml.safe_load((ROOT / FINETUNE).read_text())


def spread(values: list[float], signed: bool = False) -> str:
    form = "+.3f" if signed else ".3f"
    return f"{mean(values):{form}} ± {pstdev(values):.3f}" if len(values) > 1 else f"{values[0]:{form}}"


def tables(results: list[dict]) -> str:
    lines = ["| pretraining | seed | held-out alignment | masked-LM | colour own / other / chance | "
             "object own / other / chance | zero-shot R@1 (chance 0.01) | minutes |", "|---" * 8 + "|"]
    for r in results:
        if r["name"].startswith("pretrain") and "val/grounding/colour/own" in r:
            g = {k: r[f"val/grounding/{k}"] for k in ("colour/own", "colour/other", "colour/chance", "object/own",
                                                      "object/other", "object/chance")}
            lines.append(f"| {r['samples'] or 'recipe'} | {r['seed']} | {r['val/alignment_accuracy']:.3f} | "
                         f"{r['val/mlm_accuracy']:.3f} | {g['colour/own']:.3f} / {g['colour/other']:.3f} / "
                         f"{g['colour/chance']:.3f} | {g['object/own']:.3f} / {g['object/other']:.3f} / "
                         f"{g['object/chance']:.3f} | {r.get('val/zero_shot/R1', float('nan')):.3f} | "
                         f"{r['seconds'] / 60:.1f} |")
    vqa = [r for r in results if r["name"].startswith("vqa-")]
    by_start = defaultdict(list)
    for r in vqa:
        by_start[r["start"]].append(r)
    lines += ["", "| toy VQA start | seeds | accuracy | " + " | ".join(KINDS) + " | minutes |",
              "|---|---|---|" + "---|" * len(KINDS) + "---|"]
    for start, rows in by_start.items():
        kinds = [spread([r[f"kind/{k}"] for r in rows]) if all(f"kind/{k}" in r for r in rows) else "" for k in KINDS]
        lines.append(f"| {start} | {', '.join(str(r['seed']) for r in rows)} | {spread([r['accuracy'] for r in rows])}"
                     f" | " + " | ".join(kinds) + f" | {mean(r['seconds'] for r in rows) / 60:.1f} |")
    if vqa:
        floors = vqa[0]
        lines.append("| constant answer (floor) | | | " + " | ".join(f"{floors.get(f'floor/{k}', float('nan')):.3f}"
                                                          for k in KINDS) + " | |")
    lines += ["", budget_curve(results)]
    return "\n".join(lines)


def budget_curve(results: list[dict]) -> str:
    """Toy VQA, its gain over no pretraining (per seed, then the mean) and the grounding probe
    against the pretraining samples, mean ± spread over the seeds each point has."""
    named = {r["name"]: r for r in results}
    recipe_samples = pretrain_config()["optim"]["steps"] * pretrain_config()["optim"]["global_batch_size"]
    points = defaultdict(list)  # samples -> [(pretraining row or None, its VQA row, that seed's baseline)]
    for r in results:
        if r["name"].startswith("vqa-none-"):
            points[0].append((None, r, r))
    for r in results:
        if r["name"].startswith("pretrain-"):
            start = f"n{r['samples']}" if r["samples"] else "pretrained"
            vqa, base = named.get(f"vqa-{start}-s{r['seed']}"), named.get(f"vqa-none-s{r['seed']}")
            if vqa and base:
                points[r["samples"] or recipe_samples].append((r, vqa, base))
    lines = ["| pretraining samples | seeds | colour own / other | object own / other | held-out alignment | "
             "toy VQA | gain over none |", "|---|---|---|---|---|---|---|"]
    for samples, rows in sorted(points.items()):
        probed = [p for p, _, _ in rows if p and "val/grounding/colour/own" in p]
        probe = " | ".join(" / ".join(spread([p[f"val/grounding/{k}"] for p in probed]) for k in pair)
                           for pair in (("colour/own", "colour/other"), ("object/own", "object/other"))) \
            + f" | {spread([p['val/alignment_accuracy'] for p in probed])}" if probed else " | | "
        lines.append(f"| {samples:,} | {', '.join(str(v['seed']) for _, v, _ in rows)} | {probe} | "
                     f"{spread([v['accuracy'] for _, v, _ in rows])} | "
                     f"{spread([v['accuracy'] - b['accuracy'] for _, v, b in rows], signed=True)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="*", default=[3_000, 10_000, 64_000],
                        help="pretraining samples of the budget curve (besides 0, no pretraining, and the recipe's)")
    parser.add_argument("--budget-seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="the seeds of each budget point (each needs that seed's no-pretraining run)")
    parser.add_argument("--out", default="runs/transfer")
    parser.add_argument("--table", action="store_true", help="print what results.jsonl holds and stop")
    parser.add_argument("--finetune", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every fine-tuning run (the same for both starts)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="for every pretraining run")
    args = parser.parse_args()
    bench = Benchmark(Path(args.out), args.overrides, args.finetune)
    if not args.table:
        write_data(pretrain_config(), finetune_config())
        for seed in args.seeds:  # the recipe: probes, then the two starts
            pretrained = bench.pretrain(seed)
            bench.finetune(seed, "pretrained", pretrained["model"])
            bench.finetune(seed, "none", "")
        for samples in args.budgets:  # the budget curve, one point at a time over its seeds
            for seed in args.budget_seeds:
                if bench.done(f"vqa-none-s{seed}") is None:
                    bench.finetune(seed, "none", "")
                bench.finetune(seed, f"n{samples}", bench.pretrain(seed, samples)["model"])
    print(tables(bench.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
