"""`vilbert ablate FILE`: an ablation's jobs one after another on this machine, each as its
own `python -m vilbert` process (the single commands' code path; a crash stays in its job).
Finished jobs are skipped, stopped ones resume; a failed job does not stop the others (its
fine-tunes are skipped: they need it). At the end `vilbert compare`'s tables go to
<output_dir>/compare and to the parent run."""

from __future__ import annotations

import logging
import subprocess
import sys
import time

from vilbert.ablation.jobs import Job, describe, plan
from vilbert.ablation.parent import close_parent, mark_failed, open_parent
from vilbert.ablation.spec import Ablation
from vilbert.train.tracking import experiment_of, ui_hint

log = logging.getLogger(__name__)


def run_job(job: Job, ablation: Ablation, parent_run_id: str) -> bool:
    """One job in a child process, its output in <run_dir>.log; True if it succeeded."""
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = job.run_dir.with_suffix(".log")
    with log_path.open("a") as out:
        done = subprocess.run([sys.executable, "-m", "vilbert", *job.command(ablation, parent_run_id)],
                              stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        mark_failed(job.run_dir, ablation.uri)
        last = [line for line in log_path.read_text().splitlines() if line.strip()][-1:]
        print(f"    failed (exit {done.returncode}): {last[0] if last else ''}\n    log: {log_path}", flush=True)
    return done.returncode == 0


def run_ablation(ablation: Ablation, dry_run: bool = False) -> list[str]:
    """Run what is not done; returns the names of the jobs that failed (or could not start)."""
    jobs = plan(ablation)
    print(f"ablation {ablation.name}: {len(ablation.cells)} cells, {len(jobs)} jobs -> {ablation.output_dir}")
    print(describe(jobs), flush=True)
    if dry_run:
        return []
    parent_run_id = open_parent(ablation)
    print(f"MLflow: parent run {parent_run_id}, experiment {ablation.experiment!r}; "
          f"{ui_hint(ablation.uri, experiment_of(ablation.uri, parent_run_id), ablation.name)}", flush=True)
    failed: list[str] = []
    for number, job in enumerate(jobs, 1):
        if job.done():
            continue
        if job.needs is not None and job.needs.name in failed:
            print(f"[{number}/{len(jobs)}] {job.name}: skipped ({job.needs.name} failed)", flush=True)
            failed.append(job.name)
            continue
        print(f"[{number}/{len(jobs)}] {job.name} ...", flush=True)
        began = time.monotonic()
        if run_job(job, ablation, parent_run_id):
            print(f"    done in {(time.monotonic() - began) / 60:.1f} min", flush=True)
        else:
            failed.append(job.name)
    close_parent(ablation, parent_run_id, failed)
    from vilbert.ablation.compare import compare_ablation

    compare_ablation(ablation.uri, ablation.experiment, parent_run_id, ablation.output_dir / "compare")
    return failed
