"""`python launch/slurm.py`: run a vilbert command as a (multi-node) SLURM job through submitit."""

from __future__ import annotations

import argparse
import shlex
import sys

from vilbert.launch.submit import ClusterOptions, add_cluster_options, backend, sbatch_script, submit

MANAGE = ("status", "tail", "cancel")

DESCRIPTION = """\
Run a vilbert command that trains or evaluates as a SLURM job (submitit), one task per GPU.

  python launch/slurm.py COMMAND [cluster options] [COMMAND's own arguments] [-- COMMAND's arguments]
  python launch/slurm.py status|tail|cancel JOB
  python launch/slurm.py sweep FILE [cluster options]       (an ablation file: docs/ablations.md)

The launcher takes the options below and passes everything else, unchanged, to
`vilbert COMMAND` (the same YAML config and dotted overrides as on a workstation); after a
bare `--` everything goes to the command, for names that would clash. Arguments are checked
before anything is submitted.

Every task gets its rank and rendezvous from SLURM (the first host of the node list) and
runs the same engine as `vilbert COMMAND`: NCCL on GPU nodes, gloo on CPU nodes. Before a
time limit SLURM sends USR2 (--signal-delay seconds ahead; submitit's preemption warning is
the same signal): the job requeues itself (at most --max-requeues times), each task stops
at its next step boundary and writes a checkpoint if that fits in the cluster's KillWait,
and the requeued job resumes from the newest complete checkpoint into the same MLflow run.
A preemption, scancel or scontrol requeue (SIGTERM) stops each task the same way; a job
that SLURM requeues resumes the same way.
"""

EXAMPLES = """\
examples:
  # the paper's pretraining on 4 nodes x 8 GPUs, 24 h per job, requeued up to 10 times
  python launch/slurm.py pretrain --nodes 4 --gpus-per-node 8 --cpus-per-task 10 --mem 480G \\
      --time 24:00:00 --partition gpu --max-requeues 10 --config configs/paper.yaml
  # the sbatch script it would submit
  python launch/slurm.py pretrain --nodes 4 --gpus-per-node 8 --time 24:00:00 --dry-run --config configs/paper.yaml
  # 2 CPU tasks on one node; the same job without SLURM
  python launch/slurm.py pretrain --tasks-per-node 2 --config configs/toy.yaml optim.global_batch_size=64
  python launch/slurm.py pretrain --cluster local --tasks-per-node 2 --config configs/toy.yaml
  # follow, inspect, stop (a stop writes a checkpoint; continue with the same command + --resume auto)
  python launch/slurm.py tail 4242
  python launch/slurm.py status 4242
  python launch/slurm.py cancel 4242
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="launch/slurm.py", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("command", help="a vilbert command that trains or evaluates (e.g. pretrain), "
                                        "status / tail / cancel JOB, or sweep FILE (an ablation)")
    add_cluster_options(parser)
    return parser


def _manage(argv: list[str]) -> int:
    from vilbert.launch import manage

    parser = argparse.ArgumentParser(prog=f"launch/slurm.py {argv[0]}", allow_abbrev=False)
    parser.add_argument("job", help="SLURM job id")
    parser.add_argument("--log-dir", default="runs/slurm", help="the job's --log-dir [runs/slurm]")
    if argv[0] == "tail":
        parser.add_argument("--lines", type=int, default=20, help="lines to show before following [20]")
        parser.add_argument("--no-follow", action="store_true", help="print and exit")
    args = parser.parse_args(argv[1:])
    if argv[0] == "status":
        return manage.status(args.job, args.log_dir)
    if argv[0] == "tail":
        return manage.tail(args.job, args.log_dir, args.lines, follow=not args.no_follow)
    return manage.cancel(args.job)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in MANAGE:
        return _manage(argv)
    if argv and argv[0] == "sweep":
        from vilbert.launch.sweep import main as sweep

        return sweep(argv[1:])
    own, passthrough = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = build_parser()
    args, rest = parser.parse_known_args(own)

    from vilbert.cli import launchable_commands, parse_args

    commands = launchable_commands()
    if args.command not in commands:
        parser.error(f"{args.command!r} is not a vilbert command that trains or evaluates: {', '.join(commands)}; "
                     f"or one of {', '.join(MANAGE)}")
    command_argv = [args.command, *rest, *passthrough]
    command = commands[args.command]
    checked = parse_args(command.parser, command_argv[1:])  # exits with the command's usage on a bad argument
    options = ClusterOptions(**{k: v for k, v in vars(args).items()
                                if k not in ("command", "dry_run", "wait")})
    if command.check is not None:
        try:
            command.check(checked, options.nodes * options.tasks)
        except (ValueError, OSError, RuntimeError) as e:
            print(f"launch/slurm.py: not submitted: {e}", file=sys.stderr)
            return 2
    line = "vilbert " + " ".join(shlex.quote(a) for a in command_argv)
    where = backend(args.cluster)
    if args.dry_run and not where.script:
        parser.error(f"--dry-run shows the script a job is submitted with: --cluster {args.cluster} has none")
    try:
        if args.dry_run:
            print(sbatch_script(options))
            print(f"# each task runs: {line}")
            return 0
        job = submit(options, command_argv, resumable=command.resumable)
    except ValueError as e:  # an option submitit or SLURM's formats refuse (--time, --env, --nodes)
        parser.error(str(e))
    tasks = f"{options.nodes} node(s) x {options.tasks} task(s)"
    print(f"submitted job {job.job_id} ({args.cluster}, {tasks}): {line}")
    print(f"  logs:   {job.paths.stderr} (rank 0)")
    if where.queued:
        print(f"  follow: python launch/slurm.py tail {job.job_id} --log-dir {args.log_dir}\n"
              f"  status: python launch/slurm.py status {job.job_id} --log-dir {args.log_dir}\n"
              f"  cancel: python launch/slurm.py cancel {job.job_id}")
    if args.wait or not where.queued:
        try:
            job.results()
        except Exception as e:  # submitit raises with the task's traceback
            print(f"job {job.job_id} failed:\n{e}", file=sys.stderr)
            return 1
        print(f"job {job.job_id} done")
    return 0
