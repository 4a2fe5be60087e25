"""Experiment tracking: MLflow on global rank 0, and a local metrics.jsonl that always works.

The default store is an embedded SQLite file (nothing to start); MLFLOW_TRACKING_URI or
`tracking.uri` point elsewhere. If MLflow fails (down at start, or mid-run), training goes
on: the tracker warns once, stops calling MLflow, and every metric is still in
`<output_dir>/metrics.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path

from vilbert.train.config import TrackingConfig

log = logging.getLogger(__name__)


def default_uri(output_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Tracker:
    def __init__(self, config: TrackingConfig, output_dir: str | Path, enabled: bool):
        self.config, self.enabled = config, enabled
        self.output_dir = Path(output_dir)
        self.uri = config.uri or default_uri(output_dir)
        self._mlflow = None
        self._jsonl = None
        self.run_id = ""
        if enabled:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.output_dir / "metrics.jsonl", "a")

    def _call(self, what: str, fn, *args, **kwargs):
        if self._mlflow is None:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # a tracking failure must never stop training
            log.warning("MLflow %s failed (%s: %s); training goes on, metrics still go to %s", what,
                        type(e).__name__, e, self.output_dir / "metrics.jsonl")
            self._mlflow = None
            return None

    def start(self, params: dict, run_name: str) -> None:
        if not self.enabled or not self.config.enabled:
            return
        # Fail fast on a dead server instead of MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        self._mlflow = mlflow

        def begin():
            mlflow.set_tracking_uri(self.uri)
            if mlflow.get_experiment_by_name(self.config.experiment) is None and self.uri.startswith("sqlite:"):
                artifacts = Path(self.uri.removeprefix("sqlite:///")).parent / "mlartifacts"
                mlflow.create_experiment(self.config.experiment, artifact_location=artifacts.resolve().as_uri())
            mlflow.set_experiment(self.config.experiment)
            self.run_id = mlflow.start_run(run_name=run_name, log_system_metrics=self.config.system_metrics).info.run_id
            items = list(params.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})

        self._call("start", begin)
        if self._mlflow is not None:
            log.info("MLflow run in %s, experiment %r", self.uri, self.config.experiment)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        self._call("log_metrics", lambda: self._mlflow.log_metrics(metrics, step=step))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled:
            return
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", lambda: self._mlflow.log_artifacts(str(path), artifact_path))
        else:
            self._call("log_artifact", lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        self._call("end_run", lambda: self._mlflow.end_run(status=status))
        self._jsonl.close()
