"""Experiment tracking: MLflow on global rank 0, and a local metrics.jsonl that always works.

One training is one MLflow run, whatever happens to it: the run id is kept in
`<output_dir>/tracking.json`, and a resumed run (`--resume auto`, a requeued SLURM job)
continues it. MLflow receives a step's metrics once the checkpoint that covers the step is
complete (`commit`, called after each save), so a resume never logs a step twice: the steps
redone after an interruption are the first to reach MLflow. `metrics.jsonl` is live, and
a resume cuts it back to the resumed step.

The default store is an embedded SQLite file (nothing to start); MLFLOW_TRACKING_URI or
`tracking.uri` point elsewhere. If MLflow fails (down at start, or mid-run), training goes
on and every metric is still in `<output_dir>/metrics.jsonl`. What MLflow missed is sent
when it is back: each commit retries the backlog (at most every `tracking.retry_s`), in step order,
and `tracking.json` records the last step MLflow has (`mlflow_step`), so the next start of
the same run sends the rest from metrics.jsonl. Each step reaches MLflow once; the run's
`tracking.late_steps` tag counts the steps that arrived late.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vilbert.config_schema import non_negative, positive


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow; metrics.jsonl is written regardless
    uri: str = ""  # default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/../mlflow.db
    experiment: str = "vilbert-pretraining"
    run_name: str = ""  # default: the output directory's name, the seed and the start time (default_run_name)
    parent_run_id: str = ""  # nest the run under this MLflow run (an ablation's parent run)
    tags: dict[str, str] = field(default_factory=dict)  # set on the run (an ablation's job: its cell and stage)
    params: dict[str, str] = field(default_factory=dict)  # logged beside the config's (an ablation cell's values,
    #                                                        so that MLflow's compare view plots them)
    log_every: int = positive(10)
    system_metrics: bool = True
    new_run: bool = False  # a resumed run continues its MLflow run; true: start a new one
    retry_s: float = non_negative(60.0)  # while MLflow is down, how often a commit tries again (a try may wait 10 s)

    def due(self, step: int, last_step: int) -> bool:
        """Whether step `step` logs its metrics (an evaluation step logs too)."""
        return step % self.log_every == 0 or step == last_step

log = logging.getLogger(__name__)

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")  # MLflow 3's UI: the model-training
#                                                                          view (runs, charts), not GenAI's
VIEW_TAG, DEFAULT_VIEW = "mlflow.sharedViewState.", "vilbert"  # an experiment tag holding a runs-table view
DECIDING_METRICS = ("val/best_accuracy", "val/alignment_accuracy", "val/mlm_accuracy", "val/grounding/object/own",
                    "val/grounding/colour/own", "val/zero_shot/R1", "train/loss")  # the runs table's columns, where
#                                                                                   a run has them
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "tracking.json"  # {"run_id", "uri", "experiment", "slurm_jobs": {job id: restarts},
#                                "mlflow_step": the last step MLflow has, "late_steps": steps sent late}
MLFLOW_BATCH = 1000  # metrics per log_batch call (MLflow's limit)
METRIC_NAME = re.compile(r"[\w\-. :/]+")  # what MLflow accepts: a name outside it fails the whole batch


def default_uri(output_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve().parent / 'mlflow.db'}"


def default_run_name(output_dir: str | Path, seed: int) -> str:
    """`toy-s0-1202-1640`: the output directory, the seed and the start, so that the runs of
    one config (the demo, seeds of a benchmark) tell apart in MLflow's runs table."""
    return f"{Path(output_dir).name}-s{seed}-{time.strftime('%m%d-%H%M')}"


def experiment_of(uri: str, run_id: str) -> str:
    """The experiment id of a run ("0" where the store cannot say: MLflow's default experiment)."""
    import mlflow

    try:
        return mlflow.MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # the store went away: the hint still names the command
        return "0"


def ui_hint(uri: str, experiment_id: str, view: str = "") -> str:
    """How to look at an experiment: the `mlflow ui` command and the page to open."""
    return (f"open the UI with:\n    mlflow ui --backend-store-uri {uri} --port 5000\n"
            f"    then {view_url(experiment_id, view)}")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def open_experiment(uri: str, name: str):
    """Point mlflow at `uri` and make `name` the active experiment: created if missing (in a
    SQLite store with its artifacts in `mlartifacts/` beside the database), tagged to open in
    MLflow's model-training view, with the project's runs-table view (`view_url`)."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(name) is None and uri.startswith("sqlite:"):
        artifacts = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        mlflow.create_experiment(name, artifact_location=artifacts.resolve().as_uri())
    experiment = mlflow.set_experiment(name)
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
        mlflow.set_experiment_tag(*EXPERIMENT_KIND)
    if f"{VIEW_TAG}{DEFAULT_VIEW}" not in experiment.tags:
        save_view(uri, experiment.experiment_id, DEFAULT_VIEW, [f"metrics.`{m}`" for m in DECIDING_METRICS])
    return experiment


def save_view(uri: str, experiment_id: str, key: str, columns: list[str], search: str = "",
              group_by: list[tuple[str, str]] = ()) -> None:
    """A runs-table view of the experiment that `view_url(..., key)` opens: these columns
    ("metrics.`val/loss`", "params.`seed`"), the runs `search` finds (MLflow's filter syntax),
    grouped by these ("param" | "tag", name) with the groups' means, newest first, every run
    in the charts."""
    import mlflow

    state = {"selectedColumns": columns, "searchFilter": search, "orderByKey": "attributes.start_time",
             "orderByAsc": False, "runsHiddenMode": "SHOW_ALL",
             "groupBy": {"aggregateFunction": "average", "groupByKeys": [
                 {"mode": mode, "groupByData": name} for mode, name in group_by]} if group_by else None}
    mlflow.MlflowClient(uri).set_experiment_tag(experiment_id, f"{VIEW_TAG}{key}", json.dumps(state))


def view_url(experiment_id: str, key: str = "", server: str = "http://127.0.0.1:5000") -> str:
    """The runs table of `mlflow ui`, in the model-training view (MLflow 3's sidebar switch
    decides the view; the URL sets it), with a saved view's columns."""
    return (f"{server}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={key or DEFAULT_VIEW}")


def read_metrics(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def read_state(output_dir: str | Path) -> dict:
    """The run's tracking state (`tracking.json`): its MLflow run id, store and experiment."""
    path = Path(output_dir) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def _cut_metrics(output_dir: Path, last_step: int) -> None:
    """Keep the steps up to `last_step`: the later ones are redone by the resumed run."""
    kept = [m for m in read_metrics(output_dir) if m["step"] <= last_step]
    temporary = output_dir / f".{METRICS_FILE}.tmp"
    temporary.write_text("".join(json.dumps(m) + "\n" for m in kept))
    os.replace(temporary, output_dir / METRICS_FILE)


class Tracker:
    def __init__(self, config: TrackingConfig, output_dir: str | Path, enabled: bool):
        self.config, self.enabled = config, enabled
        self.output_dir = Path(output_dir)
        self.uri = config.uri or default_uri(output_dir)
        self._mlflow = None
        self._jsonl = None
        self._pending: list[tuple[int, int, dict[str, float]]] = []  # (step, time in ms, metrics) not yet committed
        self._backlog: list[tuple[int, int, dict[str, float]]] = []  # committed, not yet in MLflow (it was down)
        self._begin = None  # starts (or continues) the MLflow run; kept to retry while MLflow is down
        self._state: dict = {}
        self._down_since: float | None = None
        self._last_try = 0.0
        self._late: set[int] = set()  # steps of the backlog that MLflow should have had already
        self.run_id = ""

    def _call(self, what: str, fn, *args, **kwargs) -> bool:
        """Call MLflow; False if it failed (warned once per outage: training never stops for it)."""
        try:
            fn(*args, **kwargs)
        except Exception as e:
            if self._down_since is None:
                log.warning("MLflow %s failed (%s: %s); training goes on, metrics go to %s and are sent to MLflow "
                            "when it is back", what, type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                            self.output_dir / METRICS_FILE)
                self._down_since = time.monotonic()
            self._last_try = time.monotonic()
            return False
        if self._down_since is not None:
            log.info("MLflow is back after %.0f s", time.monotonic() - self._down_since)
            self._down_since = None
        return True

    def _write_state(self, **changes) -> None:
        self._state.update(changes)
        temporary = self.output_dir / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(self._state, indent=1))
        os.replace(temporary, self.output_dir / STATE_FILE)

    def start(self, params: dict, run_name: str, resumed_step: int | None = None, new_run: bool = False,
              slurm_job: dict | None = None, tags: dict[str, str] | None = None) -> None:
        """`resumed_step`: the step a resumed run continues from (None: a fresh run), whose
        MLflow run is continued unless `new_run`. `slurm_job`: {"job_id", "nodelist", "restarts"}.
        `tags`: set on the MLflow run (a resume's config changes)."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is not None:
            _cut_metrics(self.output_dir, resumed_step)
        self._jsonl = open(self.output_dir / METRICS_FILE, "a")
        if not self.config.enabled:
            return
        # Fail fast on a dead server instead of MLflow's minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        import mlflow

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "creating tables" on every new store
        self._mlflow = mlflow
        state = read_state(self.output_dir) if resumed_step is not None and not new_run else {}
        if state and (state.get("uri"), state.get("experiment")) != (self.uri, self.config.experiment):
            log.warning("this run logged to MLflow at %s (experiment %r); now %s (%r): starting a new MLflow run",
                        state.get("uri"), state.get("experiment"), self.uri, self.config.experiment)
            state = {}
        jobs = dict(state.get("slurm_jobs", {}))
        if slurm_job:
            jobs[slurm_job["job_id"]] = slurm_job["restarts"]
        self._state = {"run_id": state.get("run_id", ""), "uri": self.uri, "experiment": self.config.experiment,
                       "slurm_jobs": jobs, "mlflow_step": state.get("mlflow_step", 0),
                       "late_steps": state.get("late_steps", 0)}
        if state.get("run_id") and resumed_step:  # what MLflow missed of the steps this start keeps
            missed = [(m["step"], int(time.time() * 1000), {k: v for k, v in m.items() if k != "step"})
                      for m in read_metrics(self.output_dir) if self._state["mlflow_step"] < m["step"] <= resumed_step]
            self._backlog, self._late = missed, {step for step, _, _ in missed}
            if missed:
                log.info("MLflow missed steps %d-%d of this run: sending them from %s", missed[0][0], missed[-1][0],
                         METRICS_FILE)

        def begin():
            if mlflow.active_run() is not None:  # an earlier try got that far
                mlflow.end_run()
            open_experiment(self.uri, self.config.experiment)
            run = None
            if self._state["run_id"]:
                try:
                    run = mlflow.start_run(run_id=self._state["run_id"], log_system_metrics=self.config.system_metrics)
                except Exception as e:  # deleted in the meantime, or another store
                    if "RESOURCE_DOES_NOT_EXIST" not in str(e) and "not found" not in str(e).lower():
                        raise  # the server, not the run: try again later
                    log.warning("cannot continue MLflow run %s (%s); starting a new one", self._state["run_id"], e)
                    self._backlog = []  # the new run starts at this step
            continued = run is not None
            parent = {"mlflow.parentRunId": self.config.parent_run_id} if self.config.parent_run_id else {}
            run = run or mlflow.start_run(run_name=run_name, log_system_metrics=self.config.system_metrics,
                                          tags={**parent, **{k: str(v) for k, v in self.config.tags.items()}})
            self.run_id = run.info.run_id
            self._write_state(run_id=self.run_id)
            if not continued:
                items = [(k, v) for k, v in params.items() if not k.startswith(("tracking.tags.", "tracking.params."))]
                items += list(self.config.params.items())
                for i in range(0, len(items), 100):  # MLflow takes at most 100 params per call
                    mlflow.log_params({k: str(v)[:6000] for k, v in items[i:i + 100]})
            starts = int(mlflow.get_run(self.run_id).data.tags.get("starts", "0")) + 1
            run_tags = {"starts": starts, "resumed_from_step": resumed_step or 0, **(tags or {})}
            if slurm_job:
                run_tags.update({"slurm.job_ids": ",".join(jobs), "slurm.nodelist": slurm_job["nodelist"],
                                 "slurm.requeues": sum(jobs.values())})
            mlflow.set_tags(run_tags)
            self._begin = None

        self._begin = begin
        if self._call("start", begin):
            log.info("MLflow run %s in %s, experiment %r", self.run_id, self.uri, self.config.experiment)
            self._send()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Now to metrics.jsonl; to MLflow at the next `commit`. A name MLflow would refuse is
        an error here, at its first step, not a run whose every metric MLflow refuses."""
        if not self.enabled:
            return
        refused = [name for name in metrics if not METRIC_NAME.fullmatch(name)]
        if refused:
            raise ValueError(f"metric names MLflow refuses: {refused} (letters, digits, _ - . : / and spaces only)")
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        self._pending.append((step, int(time.time() * 1000), metrics))

    def commit(self) -> None:
        """Send the metrics logged so far to MLflow: a checkpoint now covers their steps."""
        if not self.enabled or self._mlflow is None:
            self._pending = []
            return
        self._backlog += self._pending
        self._pending = []
        if self._down_since is not None and time.monotonic() - self._last_try < self.config.retry_s:
            return
        if self._begin is not None and not self._call("start", self._begin):
            self._late.update(step for step, _, _ in self._backlog)
            return
        self._send()

    def _send(self) -> None:
        """The backlog to MLflow in step order, whole steps per call; `mlflow_step` follows."""
        from mlflow.entities import Metric

        while self._backlog:
            count, size = 0, 0
            for _, _, metrics in self._backlog:  # whole steps, at most MLFLOW_BATCH metrics (one step may exceed it)
                if count and size + len(metrics) > MLFLOW_BATCH:
                    break
                count, size = count + 1, size + len(metrics)
            chunk = self._backlog[:count]
            entries = [Metric(key, float(value), at, step) for step, at, metrics in chunk
                       for key, value in metrics.items()]
            if not self._call("log_batch", self._mlflow.MlflowClient(self.uri).log_batch, self.run_id,
                              metrics=entries):
                self._late.update(step for step, _, _ in self._backlog)
                return
            del self._backlog[:count]
            steps = {step for step, _, _ in chunk}
            self._write_state(mlflow_step=max(steps), late_steps=self._state["late_steps"] + len(steps & self._late))
        if self._late:
            self._late = set()
            self._call("set_tag", self._mlflow.MlflowClient(self.uri).set_tag, self.run_id, "tracking.late_steps",
                       str(self._state["late_steps"]))

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not self.enabled or self._mlflow is None or self._begin is not None:
            return
        path = Path(path)
        if path.is_dir():
            self._call("log_artifacts", lambda: self._mlflow.log_artifacts(str(path), artifact_path))
        else:
            self._call("log_artifact", lambda: self._mlflow.log_artifact(str(path), artifact_path))

    def finish(self, status: str = "FINISHED") -> None:
        if not self.enabled:
            return
        if self._pending:
            log.info("steps %d-%d are in %s only: no checkpoint covers them, so a resume redoes them",
                     self._pending[0][0], self._pending[-1][0], self.output_dir / METRICS_FILE)
            self._pending = []
        if self._backlog:
            self._send()
        if self._backlog:
            log.warning("MLflow is still down: steps %d-%d are in %s only; the next start of this run (--resume "
                        "auto) sends them", self._backlog[0][0], self._backlog[-1][0], self.output_dir / METRICS_FILE)
        if self._mlflow is not None and self._begin is None:
            self._call("end_run", self._mlflow.end_run, status=status)
        if self._jsonl is not None:
            self._jsonl.close()


def log_evaluation(output_dir: str | Path, config: TrackingConfig, metrics: dict[str, float], step: int,
                   tags: dict[str, str]) -> None:
    """Add an evaluation's metrics and tags to a finished run: to its metrics.jsonl, and to
    its MLflow run (the one in tracking.json), which MLflow failing never stops."""
    output_dir = Path(output_dir)
    with open(output_dir / METRICS_FILE, "a") as jsonl:
        jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    state = read_state(output_dir)
    if not config.enabled or not state.get("run_id"):
        return
    try:
        import mlflow
        from mlflow.entities import Metric, RunTag

        at = int(time.time() * 1000)
        mlflow.MlflowClient(state["uri"]).log_batch(
            state["run_id"], metrics=[Metric(k, float(v), at, step) for k, v in metrics.items()],
            tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as e:  # the metrics are in metrics.jsonl and printed
        log.warning("MLflow logging of the evaluation failed (%s: %s)", type(e).__name__, e)
