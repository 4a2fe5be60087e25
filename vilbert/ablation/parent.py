"""The parent MLflow run of an ablation: every job's run nests under it, and it holds the
ablation file, the cells (`cells.json`, which `vilbert compare` reads) and the final tables.
Its id is kept in `<output_dir>/ablation.json`, so a rerun (or the SLURM jobs) continues it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from vilbert.ablation.spec import Ablation

STATE_FILE = "ablation.json"
CELLS_ARTIFACT = "cells.json"
ROLE_TAG = ("ablation.role", "parent")  # how `vilbert compare` finds an experiment's ablations


def cells_record(ablation: Ablation) -> dict:
    """What `vilbert compare` needs besides the child runs: every cell (so that one never
    started shows as missing), the tasks, the reference cell and the varied keys."""
    return {"name": ablation.name, "cells": [cell.values for cell in ablation.cells], "tasks": list(ablation.tasks),
            "reference": ablation.reference.values, "varied": ablation.varied()}


def open_parent(ablation: Ablation) -> str:
    """The parent run's id: this output directory's (continued), else a new run."""
    import mlflow

    from vilbert.train.tracking import open_experiment, save_view

    state_path = ablation.output_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    experiment = open_experiment(ablation.uri, ablation.experiment)
    client = mlflow.MlflowClient(ablation.uri)
    if state.get("uri") == ablation.uri and state.get("parent_run_id"):
        try:
            client.update_run(state["parent_run_id"], status="RUNNING")
            run_id = state["parent_run_id"]
        except mlflow.exceptions.MlflowException:  # deleted from the store: start another
            run_id = ""
    else:
        run_id = ""
    if not run_id:
        run = client.create_run(experiment.experiment_id, run_name=f"ablation {ablation.name}",
                                tags={ROLE_TAG[0]: ROLE_TAG[1], "ablation": ablation.name})
        run_id = run.info.run_id
        client.log_batch(run_id, params=[mlflow.entities.Param(f"axis.{key}", json.dumps(
            [cell.values.get(key) for cell in ablation.cells])[:6000]) for key in ablation.keys])
        ablation.output_dir.mkdir(parents=True, exist_ok=True)
        temporary = state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"parent_run_id": run_id, "uri": ablation.uri,
                                         "experiment": ablation.experiment}, indent=1))
        os.replace(temporary, state_path)
    log_files(ablation, run_id, {ablation.source.name: ablation.source.read_text(),
                                 CELLS_ARTIFACT: json.dumps(cells_record(ablation), indent=1)})
    save_view(ablation.uri, experiment.experiment_id, ablation.name, view_columns(ablation),  # its jobs, by job
              search=f"tags.`ablation` = '{ablation.name}' and tags.`ablation.stage` LIKE '%'",  # and configuration:
              group_by=[("tag", "ablation.stage")] + [("param", f"cell.{key}") for key in ablation.varied()])  # seeds
    #                                                                                               averaged
    return run_id


def view_columns(ablation: Ablation) -> list[str]:
    """The runs table of the ablation's view: the cell's values, then each job's deciding
    metric (a fine-tune's best validation metric, a pretraining's held-out alignment)."""
    from vilbert.ablation.jobs import PRETRAIN, deciding_metric

    metrics = [deciding_metric(stage) for stage in [*ablation.tasks, PRETRAIN]]
    return [f"params.`cell.{key}`" for key in ablation.keys] + [f"metrics.`{m}`" for m in metrics]


def log_files(ablation: Ablation, run_id: str, files: dict[str, str], artifact_path: str | None = None) -> None:
    """Text files as artifacts of the parent run (written under the output directory first)."""
    import mlflow

    folder = ablation.output_dir / "parent" / (artifact_path or "")
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
        mlflow.MlflowClient(ablation.uri).log_artifact(run_id, str(folder / name), artifact_path)


def close_parent(ablation: Ablation, run_id: str, failed: list[str]) -> None:
    import mlflow

    client = mlflow.MlflowClient(ablation.uri)
    client.set_tag(run_id, "ablation.failed_jobs", ", ".join(failed) or "none")
    client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def mark_failed(run_dir: Path, uri: str) -> None:
    """A job that exited with an error leaves its MLflow run FAILED (a crashed process can
    leave it RUNNING), so the compare view shows it as failed."""
    import mlflow

    from vilbert.train.tracking import read_state

    run_id = read_state(run_dir).get("run_id")
    if run_id:
        try:
            mlflow.MlflowClient(uri).set_terminated(run_id, "FAILED")
        except mlflow.exceptions.MlflowException:
            pass  # the store is down: the run stays as it was; compare reads it as not finished
