"""`python launch/slurm.py sweep FILE`: an ablation's jobs as SLURM job arrays.

The jobs still to do (`vilbert.ablation.jobs`) go out as: the pretraining cells as one
array; each cell's fine-tunes as an array that starts after its pretraining succeeded
(`--dependency=afterok:<array>_<index>`, with `--kill-on-invalid-dep=yes` so that a failed
pretraining cancels them; none where the pretraining is already done or the cell has none);
and a last job, after all of them whatever their outcome (`afterany`), that closes the
parent MLflow run and writes `vilbert compare`'s tables. Every job is the same `VilbertJob`
as `launch/slurm.py pretrain`'s, with its cluster options, so preemption, requeue and resume
work as for any job. Resubmitting the same file skips what is done and resumes what stopped
part way.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from vilbert.ablation.jobs import PRETRAIN, Job, plan
from vilbert.ablation.spec import Ablation, load_ablation
from vilbert.launch.job import VilbertJob
from vilbert.launch.submit import ClusterOptions, add_cluster_options, build_executor


@dataclass
class Array:
    name: str
    jobs: list[Job]
    after: list[Job] = field(default_factory=list)  # the pretrainings these jobs need (afterok)


def arrays(jobs: list[Job]) -> list[Array]:
    """What is left to run, as arrays: the pretrainings, then one array per cell's fine-tunes."""
    todo = [job for job in jobs if not job.done()]
    pretraining = [job for job in todo if job.stage == PRETRAIN]
    grouped = [Array("pretrain", pretraining)] if pretraining else []
    cells: dict[str, Array] = {}
    for job in todo:
        if job.stage != PRETRAIN:
            needs = [job.needs] if job.needs is not None and job.needs in pretraining else []
            cells.setdefault(job.cell.name, Array(f"finetune {job.cell.name}", [], needs)).jobs.append(job)
    return grouped + list(cells.values())


def describe(groups: list[Array]) -> str:
    lines = []
    for number, group in enumerate(groups):
        after = f" after {', '.join(j.name for j in group.after)} (afterok)" if group.after else ""
        lines.append(f"  array {number}: {group.name}, {len(group.jobs)} job(s){after}")
        lines += [f"    [{index}] {job.name}" for index, job in enumerate(group.jobs)]
    lines.append(f"  then: close the parent run and write the tables, after all {len(groups)} array(s) (afterany)")
    return "\n".join(lines)


def finish_sweep(file: str, parent_run_id: str) -> None:
    """The sweep's last job: mark the parent FINISHED (or FAILED, naming the jobs that did not
    finish) and write the tables into <output_dir>/compare and the parent run."""
    from vilbert.ablation.compare import FINISHED, compare_ablation, read_outcomes
    from vilbert.ablation.parent import close_parent

    ablation = load_ablation(file)
    _, outcomes, _ = read_outcomes(ablation.uri, ablation.experiment, parent_run_id)
    close_parent(ablation, parent_run_id, [f"{o.cell.name}/{o.stage}" for o in outcomes if o.status != FINISHED])
    print(compare_ablation(ablation.uri, ablation.experiment, parent_run_id, ablation.output_dir / "compare"))


def check_jobs(groups: list[Array], ablation: Ablation, options: ClusterOptions) -> None:
    """What `launch/slurm.py pretrain|finetune` checks before submitting (the config, its
    inputs, the batch sizes for the job's ranks, the run directory), for every job whose
    inputs exist now (a fine-tune waiting for its pretraining is checked when it starts)."""
    from vilbert.cli import launchable_commands, parse_args

    commands = launchable_commands()
    for group in groups:
        for job in group.jobs:
            if job.needs is None or job.needs.done():
                command = commands[job.args[0]]
                command.check(parse_args(command.parser, job.command(ablation, "")[1:]), options.nodes * options.tasks)


def submit_sweep(ablation: Ablation, options: ClusterOptions, dry_run: bool) -> int:
    from vilbert.ablation.parent import open_parent

    groups = arrays(plan(ablation))
    print(f"ablation {ablation.name}: {len(ablation.cells)} cells; {sum(len(g.jobs) for g in groups)} job(s) to "
          f"run in {len(groups)} array(s) -> {ablation.output_dir}")
    print(describe(groups), flush=True)
    check_jobs(groups, ablation, options)
    if dry_run or not groups:
        return 0
    parent_run_id = open_parent(ablation)
    submitted: dict[str, str] = {}  # job name -> SLURM job id (<array>_<index>)
    for group in groups:
        executor = build_executor(options)
        dependency = {}
        if group.after:  # a failed pretraining cancels its fine-tunes (else they would wait forever, and the
            #              tables' job, which waits for every job, too)
            dependency = {"dependency": "afterok:" + ":".join(submitted[j.name] for j in group.after),
                          "additional_parameters": {**executor.parameters["additional_parameters"],
                                                    "kill_on_invalid_dep": "yes"}}
        executor.update_parameters(job_name=f"{options.job_name}-{ablation.name}", **dependency)
        with executor.batch():
            handles = [executor.submit(VilbertJob(job.command(ablation, parent_run_id), resumable=True,
                                                  max_requeues=options.max_requeues)) for job in group.jobs]
        for job, handle in zip(group.jobs, handles):
            submitted[job.name] = handle.job_id
        print(f"submitted {group.name}: job(s) {', '.join(h.job_id for h in handles)}")
    executor = build_executor(options)
    executor.update_parameters(job_name=f"{options.job_name}-{ablation.name}-compare", nodes=1, ntasks_per_node=1,
                               gpus_per_node=None, dependency="afterany:" + ":".join(submitted.values()))
    last = executor.submit(finish_sweep, str(ablation.source), parent_run_id)
    print(f"submitted the tables: job {last.job_id}; MLflow parent run {parent_run_id} in {ablation.uri}\n"
          f"  follow: squeue -u $USER; python launch/slurm.py tail JOB --log-dir {options.log_dir}")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="launch/slurm.py sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("file", help="an ablation file, e.g. configs/ablations/paper.yaml")
    add_cluster_options(parser)
    args = parser.parse_args(argv)
    if args.cluster != "slurm":
        parser.error(f"--cluster {args.cluster} has no job dependencies: run the ablation with `vilbert ablate "
                     f"{args.file}` instead")
    options = ClusterOptions(**{k: v for k, v in vars(args).items() if k not in ("file", "dry_run", "wait")})
    try:
        return submit_sweep(load_ablation(args.file), options, args.dry_run)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"launch/slurm.py sweep: not submitted: {e}", file=sys.stderr)
        return 2
