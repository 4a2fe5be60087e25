"""Checkpoints: collective DeepSpeed saves, a completion marker, an atomic `latest`,
retention, resume, and export to a `save_pretrained` model.

A save is complete only once every rank has written its shard and rank 0 has written
`<tag>/COMPLETE`; only then does `latest` move (write to a temporary file, then rename). A
crash mid-save therefore leaves `latest` on the previous complete checkpoint, and
`--resume auto` ignores tags without the marker. Tags are ordered by their step number
everywhere, and `latest` always names the checkpoint just completed, which retention keeps.

The marker also records the size and SHA-256 of every file of the checkpoint, so that a
checkpoint damaged after it was written (a node dying mid-copy, a bad disk) is found before
it is loaded: `--resume auto` then falls back to the newest sound one and `resume_from`
names what it set aside (`damaged/`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vilbert.config_schema import positive
from vilbert.staging import StagedDirectory

if TYPE_CHECKING:
    import torch


@dataclass
class CheckpointConfig:
    dir: str = ""  # default: <output_dir>/checkpoints
    every_steps: int = positive(500)
    keep_last: int = positive(3)

    def due(self, step: int, last_step: int) -> bool:
        """Whether step `step` ends with a save (the loop also saves a new best, and before a stop)."""
        return step % self.every_steps == 0 or step == last_step

log = logging.getLogger(__name__)

MARKER = "COMPLETE"  # {"state": the training state, "files": {relative path: [size, sha256]}}
DAMAGED = "damaged"  # where resume moves checkpoints that fail verification
LATEST = "latest"  # the file DeepSpeed itself reads: one line, the tag
BEST = "best.json"  # fine-tuning: {"tag", "metric", "value", "step"} of the best validated checkpoint
MODEL_CONFIG = "model_config.json"
MODEL_CLASS = "model_class.txt"
CLIENT_KEY = "vilbert"  # our training state inside DeepSpeed's client state: step, samples seen, data seed


TAG_PREFIX = "step"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def tag_step(tag: str) -> int:
    if not tag.startswith(TAG_PREFIX) or not tag[len(TAG_PREFIX):].isdigit():
        raise ValueError(f"{tag!r} is not a checkpoint tag ({tag_for(1200)} is the checkpoint of step 1200)")
    return int(tag[len(TAG_PREFIX):])


def complete_tags(directory: str | Path) -> list[str]:
    """The complete checkpoints, oldest step first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    tags = [p.name for p in directory.iterdir() if p.name.startswith(TAG_PREFIX) and (p / MARKER).exists()]
    return sorted(tags, key=tag_step)


class DamagedCheckpoint(OSError):
    """A checkpoint whose files no longer match what its marker recorded."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def file_digests(tag_dir: Path) -> dict[str, list]:
    """{relative path: [size, sha256]} of every file under a checkpoint (its marker aside)."""
    return {str(p.relative_to(tag_dir)): [p.stat().st_size, _sha256(p)]
            for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != MARKER}


def damage(directory: str | Path, tag: str) -> str | None:
    """Why checkpoint `tag` cannot be trusted (its first differing file, in words), or None
    when every file matches its marker. Markers from before digests were recorded hold the
    state alone and are taken as they are."""
    tag_dir = Path(directory) / tag
    try:
        marker = json.loads((tag_dir / MARKER).read_text())
    except (OSError, ValueError) as e:
        return f"its {MARKER} marker is unreadable ({e})"
    recorded = marker.get("files") if isinstance(marker, dict) else None
    if recorded is None:
        return None
    for name, (size, sha) in recorded.items():
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when written"
        if _sha256(path) != sha:
            return f"{name} does not match its SHA-256 (changed after it was written)"
    return None


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def point_latest(directory: Path, tag: str) -> None:
    temporary = directory / f".{LATEST}.tmp"
    temporary.write_text(tag)
    os.replace(temporary, directory / LATEST)


def read_best(directory: str | Path) -> dict | None:
    """The best checkpoint's record, if it is still a complete checkpoint."""
    path = Path(directory) / BEST
    if not path.exists():
        return None
    best = json.loads(path.read_text())
    return best if best["tag"] in complete_tags(directory) else None


def mark_best(directory: str | Path, tag: str, metric: str, value: float, step: int) -> None:
    """Rank 0: `tag` is now the best checkpoint (retention keeps it)."""
    temporary = Path(directory) / f".{BEST}.tmp"
    temporary.write_text(json.dumps({"tag": tag, "metric": metric, "value": value, "step": step}))
    os.replace(temporary, Path(directory) / BEST)


def save(engine, directory: str | Path, state: dict, keep_last: int, is_main: bool) -> str:
    """Collective: every rank must call it. Retention keeps the newest `keep_last` and the best."""
    directory, tag = Path(directory), tag_for(state["step"])
    if is_main and (directory / tag).exists():  # a stale save of this step (an interrupted attempt)
        shutil.rmtree(directory / tag)
    barrier()
    engine.save_checkpoint(str(directory), tag=tag, client_state={CLIENT_KEY: state}, save_latest=False)
    barrier()
    if is_main:
        (directory / tag / MARKER).write_text(json.dumps({"state": state, "files": file_digests(directory / tag)}))
        point_latest(directory, tag)
        best = read_best(directory)
        done = [t for t in complete_tags(directory)  # this one is the newest
                if tag_step(t) <= state["step"] and (best is None or t != best["tag"])]
        for old in done[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(directory / old, ignore_errors=True)
    barrier()
    return tag


@dataclass(frozen=True)
class ResumePoint:
    tag: str | None  # the checkpoint to load; None: start at step 0
    damaged: dict[str, str]  # newer checkpoints that failed verification: tag -> why


def resume_from(directory: str | Path, resume: str) -> ResumePoint:
    """'auto': the newest complete checkpoint that passes verification, passing over damaged
    ones (reported, not moved: `set_aside_damaged` does that on one rank); 'none' or '':
    start fresh; anything else: that tag, which must be complete and sound. Raises
    DamagedCheckpoint when every checkpoint is damaged, or the named one is."""
    if resume in ("", "none"):
        return ResumePoint(None, {})
    tags = complete_tags(directory)
    if resume != "auto":
        if resume not in tags:
            raise FileNotFoundError(f"checkpoint {resume!r} in {directory} is missing or incomplete; complete: {tags}")
        if why := damage(directory, resume):
            raise DamagedCheckpoint(f"checkpoint {resume} in {directory} is damaged: {why}; resume from another "
                                    f"(complete: {', '.join(tags)}) or --resume auto for the newest sound one")
        return ResumePoint(resume, {})
    damaged = {}
    for tag in reversed(tags):
        if why := damage(directory, tag):
            damaged[tag] = why
            continue
        return ResumePoint(tag, damaged)
    if damaged:
        raise DamagedCheckpoint(f"every checkpoint in {directory} is damaged (" + "; ".join(
            f"{t}: {why}" for t, why in damaged.items()) + "): start again with --overwrite")
    return ResumePoint(None, {})


def resume_tag(directory: str | Path, resume: str) -> str | None:
    """The tag `resume_from` picks."""
    return resume_from(directory, resume).tag


def set_aside_damaged(directory: str | Path, damaged: dict[str, str]) -> None:
    """Rank 0: move damaged checkpoints to `damaged/` (kept for a look, never loaded), one
    line each."""
    directory = Path(directory)
    for tag, why in damaged.items():
        aside = directory / DAMAGED / tag
        if aside.exists():
            shutil.rmtree(aside)
        aside.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(directory / tag), aside)
        log.warning("checkpoint %s is damaged (%s): moved to %s; resuming from an earlier one", tag, why, aside)


def load(engine, directory: str | Path, tag: str) -> dict:
    _, client_state = engine.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
    if client_state is None or CLIENT_KEY not in client_state:
        raise RuntimeError(f"could not load checkpoint {tag} from {directory}")
    return client_state[CLIENT_KEY]


@contextlib.contextmanager
def _quietly(what: str):
    """What DeepSpeed's checkpoint conversion and transformers' writer print (their own
    progress bars and notes, a dozen lines per export) goes to the debug log instead."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        log.debug("%s said:\n%s", what, out.getvalue())


def fp32_state_dict(directory: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The full fp32 model weights of a checkpoint from any ZeRO stage: ZeRO 1-3 rebuild them
    from the partitioned fp32 master copies; ZeRO 0 keeps the module whole."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    path = Path(directory) / tag
    if list(path.glob("zero_pp_rank_*_optim_states.pt")) or list(path.glob("bf16_zero_pp_rank_*_optim_states.pt")):
        with _quietly("rebuilding fp32 weights"):
            return get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=tag)
    # Our own checkpoint (it holds DeepSpeed's objects, hence weights_only=False).
    module = torch.load(path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() for k, v in module.items()}


def export(directory: str | Path, out_dir: str | Path, tag: str | None = None):
    """Write a checkpoint's model as a `save_pretrained` directory (fp32). Returns the model."""
    from vilbert.config import ViLBERTConfig
    from vilbert.modeling.registry import class_named

    directory = Path(directory)
    if tag is None:
        tag = resume_tag(directory, "auto")  # the newest sound one (verified there)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
    elif why := damage(directory, tag):
        raise DamagedCheckpoint(f"checkpoint {tag} in {directory} is damaged: {why}")
    model = class_named((directory / MODEL_CLASS).read_text().strip())(
        ViLBERTConfig.from_json_file(directory / MODEL_CONFIG))
    state = fp32_state_dict(directory, tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"heads.mlm.decoder.weight"}  # stored once, under the word embeddings
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"checkpoint {tag} does not match the model: missing {missing}, unexpected {unexpected}")
    with _quietly("save_pretrained"), StagedDirectory(out_dir) as staged:  # a full disk leaves no half model
        model.save_pretrained(staged.path)
    log.info("exported %s/%s to %s", directory, tag, out_dir)
    return model
