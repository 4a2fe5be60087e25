"""From cluster options to a submitted job: submitit's executors (one table, `BACKENDS`) and
the sbatch script.

`--cluster slurm` uses submitit's SlurmExecutor (one task per GPU, or `--tasks-per-node` on
CPU nodes; the pre-timeout USR2 signal; `--requeue`), `local` its LocalExecutor (the tasks
as local processes, no SLURM), `debug` its DebugExecutor (in this process). The environment
a job needs is exported at the top of the sbatch script (visible in `--dry-run`), so it
reaches every task whatever the cluster's `--export` policy.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from vilbert.launch.job import VilbertJob

# Passed to every task: names, and prefixes ending in "_".
PASSED_ENV = ("PYTHONPATH", "MLFLOW_", "NCCL_", "HF_", "TRANSFORMERS_CACHE", "TORCH_HOME", "TORCH_EXTENSIONS_DIR",
              "TRITON_CACHE_DIR", "XDG_CACHE_HOME", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "DS_ACCELERATOR",
              "SUBMITIT_PREEMPT_SIGNAL")
SECRET = re.compile(r"PASSWORD|TOKEN|SECRET|_KEY$")  # never written into the script: SLURM's own export carries them
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # so that a checkout runs without being installed


@dataclass
class ClusterOptions:
    cluster: str = "slurm"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int | None = None
    mem: str | None = None
    time: str = "60"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    sbatch: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    job_name: str = "vilbert"
    log_dir: str = "runs/slurm"
    max_requeues: int = 3
    signal_delay: int = 90

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU on GPU nodes."""
        return self.gpus_per_node or self.tasks_per_node

    @property
    def folder(self) -> Path:
        return Path(self.log_dir).resolve() / "%j"


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Where a job runs and how big it is, and the job's own options (every job of a sweep too)."""
    where = parser.add_argument_group("where and how big")
    where.add_argument("--cluster", choices=list(BACKENDS), default="slurm",
                       help="submitit executor: " + ", ".join(f"{name} ({b.help})" for name, b in BACKENDS.items())
                            + " [slurm]")
    where.add_argument("--nodes", type=int, default=1, help="nodes [1]")
    where.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node, one task each [0: CPU nodes]")
    where.add_argument("--tasks-per-node", type=int, default=1, help="tasks per node on CPU nodes [1]")
    where.add_argument("--cpus-per-task", type=int, help="CPU cores per task (data workers + 1 or more)")
    where.add_argument("--mem", help="memory per node, as sbatch takes it (e.g. 480G)")
    where.add_argument("--time", default="60", help="time limit per job: minutes, HH:MM:SS or D-HH:MM:SS [60]")
    where.add_argument("--partition", help="SLURM partition")
    where.add_argument("--account", help="SLURM account")
    where.add_argument("--qos", help="SLURM quality of service")
    where.add_argument("--constraint", help="node features, e.g. a100")
    where.add_argument("--exclude", help="nodes to avoid")
    where.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="any other sbatch option, e.g. --sbatch mail-type=END (repeatable)")
    job = parser.add_argument_group("the job")
    job.add_argument("--job-name", default="vilbert", help="[vilbert]")
    job.add_argument("--log-dir", default="runs/slurm",
                     help="submitit's folder: scripts, pickles and per-task logs in LOG_DIR/JOB/ [runs/slurm]")
    job.add_argument("--max-requeues", type=int, default=3,
                     help="requeues at time limits and preemptions before the job gives up [3]")
    job.add_argument("--signal-delay", type=int, default=90,
                     help="seconds before the time limit that SLURM sends USR2 [90]")
    job.add_argument("--env", action="append", default=[], metavar="NAME[=VALUE]",
                     help="pass an environment variable to every task (beside MLFLOW_*, NCCL_*, HF_*, PYTHONPATH, "
                          "cache directories; names with PASSWORD, TOKEN, SECRET or _KEY travel only through "
                          "SLURM's own export)")
    job.add_argument("--dry-run", action="store_true", help="print the sbatch script; submit nothing")
    job.add_argument("--wait", action="store_true",
                     help="wait for the job to end (always where jobs are not queued: --cluster local, debug)")


def minutes(limit: str) -> int:
    """A SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes,
    rounded up (submitit needs minutes to tell a time limit from a preemption)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not match:
        raise ValueError(f"--time {limit!r}: use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS")
    days, first, second, third = (int(g) if g else 0 for g in match.groups())
    if match.group(1) is not None:  # D-HH[:MM[:SS]]
        hours, mins, secs = first, second, third
    elif match.group(4) is not None:  # HH:MM:SS
        hours, mins, secs = first, second, third
    else:  # MM[:SS]
        hours, mins, secs = 0, first, second
    total = ((days * 24 + hours) * 60 + mins) * 60 + secs
    if total <= 0:
        raise ValueError(f"--time {limit!r} is not a positive time limit")
    return -(-total // 60)


def passed_environment(extra: list[str]) -> dict[str, str]:
    """What every task gets from the submitting shell: the names in PASSED_ENV, `--env NAME`
    (its current value) or `--env NAME=VALUE`, and this package on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items()
           if any(k == name or (name.endswith("_") and k.startswith(name)) for name in PASSED_ENV)}
    for item in extra:
        name, sep, value = item.partition("=")
        if not sep and name not in os.environ:
            raise ValueError(f"--env {name}: not set in this environment (use --env {name}=VALUE)")
        env[name] = value if sep else os.environ[name]
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT), *[p for p in paths if p != str(PACKAGE_ROOT)]])
    return {k: v for k, v in env.items() if not SECRET.search(k)}


def _sbatch_extra(options: ClusterOptions) -> dict[str, str | bool]:
    extra: dict[str, str | bool] = {"requeue": True}  # requeueable even where the cluster's JobRequeue=0
    for item in options.sbatch:
        key, sep, value = item.partition("=")
        extra[key.strip().lstrip("-").replace("-", "_")] = value if sep else True
    return extra


def slurm_parameters(options: ClusterOptions) -> dict:
    """submitit SlurmExecutor parameters (sbatch's names)."""
    optional = {"cpus_per_task": options.cpus_per_task, "mem": options.mem, "partition": options.partition,
                "account": options.account, "qos": options.qos, "constraint": options.constraint,
                "exclude": options.exclude, "gpus_per_node": options.gpus_per_node or None}
    setup = [f"export {k}={shlex.quote(v)}" for k, v in passed_environment(options.env).items()]
    return {"job_name": options.job_name, "nodes": options.nodes, "ntasks_per_node": options.tasks,
            "time": minutes(options.time), "signal_delay_s": options.signal_delay,
            "setup": [*setup, f"cd {shlex.quote(os.getcwd())}"], "additional_parameters": _sbatch_extra(options),
            **{k: v for k, v in optional.items() if v is not None}}


class _ScriptOnlyExecutor(submitit.SlurmExecutor):
    """submitit's SLURM executor without its check for `srun`: it only writes scripts."""

    @classmethod
    def affinity(cls) -> int:
        return 1


def _slurm_executor(options: ClusterOptions, dry_run: bool):
    executor_class = _ScriptOnlyExecutor if dry_run else submitit.SlurmExecutor
    executor = executor_class(folder=options.folder, max_num_timeout=options.max_requeues)
    executor.update_parameters(**slurm_parameters(options))
    return executor


def _local_executor(options: ClusterOptions, dry_run: bool):
    if options.nodes != 1:
        raise ValueError("--cluster local runs on this machine: --nodes must be 1")
    executor = submitit.LocalExecutor(folder=options.folder, max_num_timeout=options.max_requeues)
    executor.update_parameters(tasks_per_node=options.tasks, gpus_per_node=options.gpus_per_node,
                               timeout_min=minutes(options.time), signal_delay_s=options.signal_delay)
    return executor


def _debug_executor(options: ClusterOptions, dry_run: bool):
    return submitit.DebugExecutor(folder=options.folder)


@dataclass(frozen=True)
class Backend:
    """Where `--cluster NAME` sends a job. Every task of every backend runs `VilbertJob`,
    which exports the rendezvous variables (RANK, WORLD_SIZE, ...) that the training reads
    (vilbert.train.distributed), so a backend is only how its tasks are started."""

    help: str
    executor: Callable[[ClusterOptions, bool], submitit.Executor]  # (options, dry_run) -> a submitit executor
    queued: bool = False  # jobs wait in a scheduler's queue: status/tail/cancel apply, and submitting does not wait
    script: bool = False  # --dry-run prints the script it would submit


BACKENDS: dict[str, Backend] = {  # a new backend (e.g. a Kubernetes or Ray executor of submitit's API) is one entry
    "slurm": Backend("sbatch on a SLURM cluster", _slurm_executor, queued=True, script=True),
    "local": Backend("the tasks as processes on this machine, no SLURM", _local_executor),
    "debug": Backend("in this process", _debug_executor),
}


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"--cluster {name!r}: one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def build_executor(options: ClusterOptions, dry_run: bool = False):
    return backend(options.cluster).executor(options, dry_run)


def sbatch_script(options: ClusterOptions) -> str:
    """The script submitit would submit (nothing is submitted)."""
    executor = build_executor(options, dry_run=True)
    return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")


def submit(options: ClusterOptions, argv: list[str], resumable: bool):
    executor = build_executor(options)
    job = VilbertJob(argv=argv, resumable=resumable, max_requeues=options.max_requeues)
    return executor.submit(job)
