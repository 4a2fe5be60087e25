"""One training's output directory, from its first start to its last resume.

A directory holds one run: its checkpoints, `metrics.jsonl`, the MLflow run it logs to
(`tracking.json`), its config and exported model. Starting into a directory that already
holds a run is an error unless the caller says what to do with it: `--resume auto` (or a
tag) continues it, `--overwrite` deletes it first. Resuming from an earlier checkpoint than
the newest branches the run: the later checkpoints are set aside under
`checkpoints/discarded/` (nothing is deleted) and a new MLflow run starts, since the old one
holds the abandoned steps.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from vilbert.train import checkpoint
from vilbert.train.config import TrainConfig
from vilbert.train.tracking import METRICS_FILE, STATE_FILE

log = logging.getLogger(__name__)

RUN_FILES = (METRICS_FILE, STATE_FILE, "config.yaml", "model")  # what --overwrite deletes, with the checkpoints
DISCARDED = "discarded"


class RunExists(RuntimeError):
    """The output directory already holds a run and the caller did not say what to do with it."""


@dataclass(frozen=True)
class Start:
    tag: str | None  # the checkpoint to resume from; None: step 0
    resumed: bool  # continues the directory's run (its metrics and MLflow run)
    branched: bool = False  # resumed from an earlier checkpoint than the newest

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
    """Decide how this start relates to what the directory holds. Reads only, so that every
    rank can call it and all reach the same answer (or raise the same error)."""
    if overwrite and resume not in ("", "none"):
        raise ValueError("--overwrite starts the run again and --resume continues it: pass one of them")
    tags = checkpoint.complete_tags(config.checkpoint_dir)
    held = _held_run(config, tags)
    if overwrite or resume in ("", "none"):
        if held and not overwrite:
            raise RunExists(f"{config.output_dir} already holds a run ({held}). Pass --resume auto to continue "
                            f"it, or --overwrite to delete it and start again, or choose another output_dir.")
        return Start(None, resumed=False)
    tag = checkpoint.resume_tag(config.checkpoint_dir, resume)
    return Start(tag, resumed=True, branched=tag is not None and tag != tags[-1])


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
    if start.branched:
        later = [t for t in checkpoint.complete_tags(checkpoints) if checkpoint.tag_step(t) > start.step]
        aside = checkpoints / DISCARDED / time.strftime("%Y%m%d-%H%M%S")
        aside.mkdir(parents=True)
        for tag in later:
            shutil.move(str(checkpoints / tag), aside / tag)
        checkpoint.point_latest(checkpoints, start.tag)
        log.warning("resuming from %s, an earlier checkpoint than the newest: moved %s to %s; a new MLflow run "
                    "starts", start.tag, ", ".join(later), aside)
