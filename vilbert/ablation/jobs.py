"""The jobs of an ablation: each cell's pretraining (none where `data.fraction` is 0), then
each cell's fine-tune on every task, which needs that pretraining. A job is the plain
`vilbert pretrain` / `vilbert finetune` command with the ablation's tracking keys added, so
an ablation runs the same code as the single commands, under any launcher.

A job is done when its run directory holds the exported model; a job stopped part way (a
killed run, a preempted SLURM job) resumes from its newest checkpoint; anything else starts
again (`--overwrite`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vilbert.ablation.spec import Ablation, Cell

PRETRAIN = "pretrain"  # a job's stage: pretraining, else the task's name
PRETRAINING_METRIC = "val/alignment_accuracy"  # what a pretraining job is compared by


def deciding_metric(stage: str) -> str:
    """The metric a job of `stage` is compared by: a pretraining's held-out alignment, a
    fine-tune's best validation metric (the one that picked its exported checkpoint)."""
    if stage == PRETRAIN:
        return PRETRAINING_METRIC
    from vilbert.tasks import task_class
    from vilbert.train.objective import best_names

    return best_names(f"val/{task_class(stage).val_metric}")[0]


@dataclass(frozen=True)
class Job:
    cell: Cell
    stage: str  # PRETRAIN or a task name
    run_dir: Path
    args: list[str]  # the vilbert command, without the start (--resume / --overwrite) and tracking keys
    needs: Job | None = None  # the pretraining a fine-tune starts from

    @property
    def name(self) -> str:
        return f"{self.cell.name}/{self.stage}"

    def done(self) -> bool:
        return (self.run_dir / "model" / "config.json").exists()

    def start_args(self) -> list[str]:
        """Resume a run stopped part way; start anything else again."""
        from vilbert.train.checkpoint import complete_tags

        stopped = complete_tags(self.run_dir / "checkpoints")
        return ["--resume", "auto"] if stopped else ["--overwrite"]

    def tracking_args(self, ablation: Ablation, parent_run_id: str) -> list[str]:
        """The child run of the parent, named and tagged with the cell's values."""
        values = {f"cell.{key}": str(value) for key, value in self.cell.values.items()}
        tags = {"ablation": ablation.name, "ablation.cell": self.cell.name, "ablation.stage": self.stage,
                "ablation.pretrained": str(self.cell.pretrained).lower(), **values}
        return [f"tracking.uri={ablation.uri}", f"tracking.experiment={ablation.experiment}",
                f"tracking.parent_run_id={parent_run_id}", f"tracking.run_name={self.name}",
                f"tracking.tags={json.dumps(tags)}", f"tracking.params={json.dumps(values)}"]

    def command(self, ablation: Ablation, parent_run_id: str) -> list[str]:
        """`vilbert ...` arguments of this job's next start."""
        return [*self.args, *self.start_args(), *self.tracking_args(ablation, parent_run_id)]


def plan(ablation: Ablation) -> list[Job]:
    """Every job, each pretraining before the fine-tunes that need it."""
    jobs = []
    for cell in ablation.cells:
        pretraining = Job(cell, PRETRAIN, ablation.run_dir(cell), ablation.pretraining_args(cell)) \
            if cell.pretrained else None
        jobs += [pretraining] if pretraining else []
        jobs += [Job(cell, task, ablation.run_dir(cell, task), ablation.finetuning_args(cell, task), pretraining)
                 for task in ablation.tasks]
    return jobs


def describe(jobs: list[Job]) -> str:
    """One line per job: its state, its name and what it needs (`--dry-run`)."""
    lines = []
    for job in jobs:
        state = "done" if job.done() else "resume" if job.start_args()[0] == "--resume" else "to run"
        needs = f"  (after {job.needs.name})" if job.needs else ""
        lines.append(f"  {state:7s} {job.name}{needs}")
    return "\n".join(lines)
