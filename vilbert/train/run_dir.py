"""One training's output directory, from its first start to its last resume.

A directory holds one run: its checkpoints, `metrics.jsonl`, the MLflow run it logs to
(`tracking.json`), its config and exported model. Starting into a directory that already
holds a run is an error unless the caller says what to do with it: `--resume auto` (or a
tag) continues it, `--overwrite` deletes it first. Resuming from an earlier checkpoint than
the newest branches the run: the later checkpoints are set aside under
`checkpoints/discarded/` (nothing is deleted) and a new MLflow run starts, since the old one
holds the abandoned steps.

One process group writes a directory at a time: rank 0 holds an OS lock on `.lock` for the
whole run (released by the kernel when the process dies, so a killed run never blocks the
next), and a second start refuses with the holder's host, PID and SLURM job. A requeued
SLURM job whose earlier incarnation is still exiting waits for it instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from vilbert.train import checkpoint
from vilbert.train.config import TrainConfig
from vilbert.train.distributed import from_rank0
from vilbert.train.tracking import METRICS_FILE, STATE_FILE

log = logging.getLogger(__name__)

RUN_FILES = (METRICS_FILE, STATE_FILE, "config.yaml", "model")  # what --overwrite deletes, with the checkpoints
DISCARDED = "discarded"
LAYOUT_FILE = "layout.json"  # in the checkpoint directory: {"zero_stage", "precision"} the checkpoints were written in
LOCK_FILE = ".lock"  # holds {"host", "pid", "slurm_job", "since"} of the process that writes the directory
REQUEUE_WAIT_S = 120  # how long a requeued SLURM job waits for its own earlier incarnation to let go


class RunExists(RuntimeError):
    """The output directory already holds a run and the caller did not say what to do with it."""


class ResumeRefused(ValueError):
    """The config changed what the checkpoints hold (the model, or their ZeRO layout)."""


class RunLocked(RunExists):
    """Another process is writing the output directory."""


def _describe(holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["since"])) if "since" in holder else "?"
    return f"{holder.get('host', '?')} PID {holder.get('pid', '?')}{job}, since {since}"


@contextlib.contextmanager
def owned(output_dir: str | Path, is_main: bool, slurm_job: str | None):
    """Collective: the run's hold on its directory (rank 0 takes the lock; every rank raises
    the same RunLocked if it is taken)."""
    refusal, handle = None, None
    if is_main:
        try:
            handle = lock(output_dir, slurm_job)
        except RunLocked as e:
            refusal = str(e)
    if refusal := from_rank0(refusal):
        raise RunLocked(refusal)
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


def lock(output_dir: str | Path, slurm_job: str | None = None, wait_s: float = REQUEUE_WAIT_S):
    """Rank 0: take the directory's lock for this process's lifetime (the open file is
    returned; keep it). Raises RunLocked naming the holder, unless the holder is this same
    SLURM job (a requeue racing its old self), which is waited for up to `wait_s`."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    handle = open(directory / LOCK_FILE, "a+")
    deadline = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            handle.seek(0)
            try:
                holder = json.loads(handle.read() or "{}")
            except ValueError:
                holder = {}
            same_job = slurm_job is not None and holder.get("slurm_job") == slurm_job
            deadline = deadline or time.monotonic() + wait_s
            if not same_job or time.monotonic() > deadline:
                handle.close()
                raise RunLocked(f"{directory} is being written by another run ({_describe(holder)}); wait for it to "
                                f"end, or stop it, or choose another output_dir") from None
            time.sleep(1)
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": slurm_job,
                             "since": time.time()}))
    handle.flush()
    return handle


@dataclass(frozen=True)
class Start:
    tag: str | None  # the checkpoint to resume from; None: step 0
    resumed: bool  # continues the directory's run (its metrics and MLflow run)
    branched: bool = False  # resumed from an earlier checkpoint than the newest
    damaged: dict[str, str] = field(default_factory=dict)  # newer checkpoints that failed verification: tag -> why

    @property
    def step(self) -> int:
        return checkpoint.tag_step(self.tag) if self.tag else 0


def _held_run(config: TrainConfig, tags: list[str]) -> str:
    """What the directory holds of an earlier run (`tags`: its complete checkpoints), in words."""
    logged = Path(config.output_dir) / METRICS_FILE
    held = [f"checkpoints {tags[0]}..{tags[-1]}"] if tags else []
    if logged.exists() and logged.stat().st_size:
        held.append(f"{len(logged.read_text().splitlines())} logged steps")
    if (Path(config.output_dir) / STATE_FILE).exists():
        held.append("an MLflow run")
    return ", ".join(held)


def plan(config: TrainConfig, resume: str, overwrite: bool) -> Start:
    """Decide how this start relates to what the directory holds. Reads only: the launcher
    calls it before submitting, training through `agreed_plan`."""
    if overwrite and resume not in ("", "none"):
        raise ValueError("--overwrite starts the run again and --resume continues it: pass one of them")
    tags = checkpoint.complete_tags(config.checkpoint_dir)
    held = _held_run(config, tags)
    if overwrite or resume in ("", "none"):
        if held and not overwrite:
            raise RunExists(f"{config.output_dir} already holds a run ({held}). Pass --resume auto to continue "
                            f"it, or --overwrite to delete it and start again, or choose another output_dir.")
        return Start(None, resumed=False)
    point = checkpoint.resume_from(config.checkpoint_dir, resume)
    return Start(point.tag, resumed=True, branched=point.tag is not None and point.tag != tags[-1],
                 damaged=point.damaged)


def agreed_plan(config: TrainConfig, resume: str, overwrite: bool, is_main: bool) -> Start:
    """Collective: `plan` on rank 0 (it reads and verifies the checkpoints once, not once per
    rank), its answer or its error on every rank."""
    outcome = None
    if is_main:
        try:
            outcome = (plan(config, resume, overwrite), None)
        except (ValueError, OSError, RuntimeError) as e:
            outcome = (None, e)
    start, error = from_rank0(outcome)
    if error is not None:
        raise error
    return start


def prepare(config: TrainConfig, start: Start, overwrite: bool) -> None:
    """Rank 0 only: make the directory what `start` expects (the other ranks wait at a barrier)."""
    directory, checkpoints = Path(config.output_dir), config.checkpoint_dir
    if overwrite:
        held = _held_run(config, checkpoint.complete_tags(checkpoints)) or "nothing held"
        log.warning("--overwrite: deleting the run in %s (%s)", directory, held)
        shutil.rmtree(checkpoints, ignore_errors=True)
        for name in RUN_FILES:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    checkpoint.set_aside_damaged(checkpoints, start.damaged)
    if start.branched:
        later = [t for t in checkpoint.complete_tags(checkpoints) if checkpoint.tag_step(t) > start.step]
        if later:
            aside = checkpoints / DISCARDED / time.strftime("%Y%m%d-%H%M%S")
            aside.mkdir(parents=True)
            for tag in later:
                shutil.move(str(checkpoints / tag), aside / tag)
            log.warning("resuming from %s, an earlier checkpoint than the newest: moved %s to %s", start.tag,
                        ", ".join(later), aside)
        checkpoint.point_latest(checkpoints, start.tag)
        log.warning("a new MLflow run starts at step %d: the run's MLflow run holds the steps after it", start.step)


def write_model_files(config: TrainConfig, model, layout: dict) -> None:
    """Rank 0 only: what a resume, an export and `vilbert evaluate` read back besides the
    checkpoints: the run's config, the model's class and config, the checkpoints' layout."""
    checkpoints = config.checkpoint_dir
    checkpoints.mkdir(parents=True, exist_ok=True)
    config.save(Path(config.output_dir) / "config.yaml")
    config.save(checkpoints / "config.yaml")
    model.config.to_json_file(checkpoints / checkpoint.MODEL_CONFIG, use_diff=False)
    (checkpoints / LAYOUT_FILE).write_text(json.dumps(layout))
    (checkpoints / checkpoint.MODEL_CLASS).write_text(type(model).__name__)


def _flat(tree, prefix: str = "") -> dict[str, str]:
    """{"optim.lr": "0.0001", ...} of a config tree, values as JSON (so a tuple equals its YAML list)."""
    if isinstance(tree, dict) and tree:
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): json.dumps(tree)}


ARCHITECTURE_IGNORED = {"transformers_version", "_name_or_path", "architectures", "torch_dtype", "dtype"}


def resume_changes(config: TrainConfig, model_class: str, model_config: dict, layout: dict) -> dict[str, str]:
    """What this start changes against the config the checkpoints were written under:
    {dotted key: "old -> new"} of the changes a resume may make (data, lr, batch, steps, ...).
    Raises ResumeRefused, naming the changed keys, when the model's architecture or class or
    the checkpoints' ZeRO stage or precision would change: those checkpoints cannot load."""
    checkpoints = config.checkpoint_dir
    if not (checkpoints / "config.yaml").exists():  # written by a version that did not keep it
        return {}
    import yaml

    old = _flat(yaml.safe_load((checkpoints / "config.yaml").read_text()) or {})
    new = _flat(json.loads(json.dumps(config.to_dict())))
    changes = {k: f"{json.loads(old.get(k, 'null'))} -> {json.loads(new.get(k, 'null'))}"
               for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = []
    old_class = (checkpoints / checkpoint.MODEL_CLASS).read_text().strip() \
        if (checkpoints / checkpoint.MODEL_CLASS).exists() else model_class
    if old_class != model_class:
        refused.append(f"model class {old_class} -> {model_class}")
    if (checkpoints / checkpoint.MODEL_CONFIG).exists():
        written = json.loads((checkpoints / checkpoint.MODEL_CONFIG).read_text())
        model_config = json.loads(json.dumps(model_config))  # as written: JSON keys are strings
        refused += [f"{k} {written[k]} -> {model_config.get(k)}" for k in sorted(written)
                    if k not in ARCHITECTURE_IGNORED and written[k] != model_config.get(k)]
    if (checkpoints / LAYOUT_FILE).exists():
        written = json.loads((checkpoints / LAYOUT_FILE).read_text())
        refused += [f"{k} {written[k]} -> {layout.get(k)}" for k in sorted(written) if written[k] != layout.get(k)]
    if refused:
        keys = [f"{k} {v}" for k, v in changes.items() if k.split(".")[0] in ("model", "task", "deepspeed")]
        raise ResumeRefused(
            f"cannot resume {checkpoints} with this config: {', '.join(keys) or 'the config'} changes what its "
            f"checkpoints hold ({'; '.join(refused)}). Start a new run (another output_dir, or --overwrite), or "
            f"start from its weights: vilbert export {checkpoints} <dir>, then model.init=<dir>")
    return changes
