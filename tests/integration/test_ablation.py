"""`vilbert ablate` and `vilbert compare` end to end: a 2 x 2 grid (architecture x
pretraining) of the tiny model, each cell fine-tuned on toy VQA, into a temporary MLflow
store; a rerun skips what finished; failed jobs show as failed and the others still run."""

import json
import subprocess
import sys

import mlflow

from helpers import ENV, ROOT, write_ablation


def _vilbert(*args):
    return subprocess.run([sys.executable, "-m", "vilbert", *args], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def test_a_tiny_grid_runs_into_mlflow_compares_skips_finished_jobs_and_shows_failures(tmp_path, toy_world):
    path = write_ablation(tmp_path, toy_world)
    dry = _vilbert("ablate", str(path), "--dry-run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "4 cells, 6 jobs" in dry.stdout and dry.stdout.count("to run") == 6
    assert "arch=single_stream,fraction=1.0/vqa  (after arch=single_stream,fraction=1.0/pretrain)" in dry.stdout
    assert not (tmp_path / "ablation/ablation.json").exists()  # a dry run starts nothing

    done = _vilbert("ablate", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("done in") == 6
    compare = tmp_path / "ablation/compare"
    tables = (compare / "tables.md").read_text()
    table1 = tables.split("## Table 1")[1].split("##")[0]
    for arch in ("vilbert", "single_stream"):
        for pretrained in ("no", "yes"):
            row = next(line for line in table1.splitlines() if line.startswith(f"| {arch} | {pretrained} |"))
            assert 0 <= float(row.split("|")[3]) <= 1  # a finished fine-tune's accuracy, one seed
    assert {p.name for p in compare.glob("*.png")} == {"vs_model_arch.png", "vs_data_fraction.png"}
    rows = (compare / "results.csv").read_text().splitlines()
    assert len(rows) == 1 + 6 and all(",finished," in row for row in rows[1:])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny-ablation")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    parent_id = json.loads((tmp_path / "ablation/ablation.json").read_text())["parent_run_id"]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(
        f"arch={a},fraction={f}/{s}" for a in ("vilbert", "single_stream") for f, stages in
        (("0", ["vqa"]), ("1.0", ["pretrain", "vqa"])) for s in stages)
    mlflow.set_tracking_uri(uri)
    no_pretraining = mlflow.search_runs([experiment.experiment_id], "params.`cell.data.fraction` = '0'",
                                        output_format="list")
    assert {r.data.tags["ablation.stage"] for r in no_pretraining} == {"vqa"} and len(no_pretraining) == 2
    parent_files = {a.path for a in client.list_artifacts(parent_id)}
    assert {"ablation.yaml", "cells.json", "compare"} <= parent_files
    assert client.get_run(parent_id).info.status == "FINISHED"

    again = _vilbert("ablate", str(path))  # every job is done: nothing runs, the tables are rewritten
    assert again.returncode == 0 and "..." not in again.stdout and "done in" not in again.stdout

    # Two more cells whose model cannot be built: their jobs fail (or are not run, after a failed
    # pretraining), the finished ones are kept, and the tables say so.
    path = write_ablation(tmp_path, toy_world, cells=[{}, {"model.overrides.no_such_field": 1}])
    failed = _vilbert("ablate", str(path))
    assert failed.returncode == 1 and "job(s) failed" in failed.stderr
    assert failed.stdout.count("failed (exit 1)") == 4 and failed.stdout.count("skipped (") == 2
    tables = (compare / "tables.md").read_text()
    bad = [line for line in tables.split("## Every configuration")[1].split("##")[0].splitlines()
           if line.startswith("| ") and "| 1 |" in line]
    assert len(bad) == 4 and all(line.endswith(("| 1 failed |", "| 1 not run |")) for line in bad)
    assert not any(" 0.000" in line for line in bad)
