"""How many threads torch's CPU kernels may use: the cores this process may actually run on.

torch defaults to every core of the machine. Under a scheduler or beside other ranks that
oversubscribes the cores, and an OpenMP team whose thread lost its core stalls at every
barrier, so a step can slow far more than the share it lost. The cores are those of the
process's CPU affinity, shared among the ranks on this node, less those other processes keep
busy when the run starts (measured over a quarter of a second from /proc/stat; processes of
positive nice yield to ours and count as free), capped by OMP_NUM_THREADS and
SLURM_CPUS_PER_TASK, less one per data-loader worker (each runs on a core of its own).

Measured (docs/benchmarks.md): the demo's pretraining beside one busy process on 2 cores ran
at 25.6 samples/s with 2 threads and 73.6 with 1, against 83 alone.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)
LIMITS = ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")  # environment variables that cap the cores
# How each launcher says how many ranks share this node: torchrun and submitit, the deepspeed
# launcher, srun (SLURM_TASKS_PER_NODE reads like "4(x2),3": this node's count comes first
# only on the first node, so SLURM_NTASKS_PER_NODE is preferred where the job set it).
LOCAL_RANKS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")


def local_ranks(env=os.environ) -> int:
    """The ranks on this node, under any launcher (1 when none says)."""
    for name in LOCAL_RANKS:
        if name.startswith("SLURM") and "SLURM_PROCID" not in env:  # an sbatch shell, not a task
            continue
        value = env.get(name, "").split("(")[0].split(",")[0]
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def cpu_times(cpus: set[int], stat: str = "/proc/stat") -> tuple[int, int] | None:
    """(busy, total) jiffies of `cpus` since boot from /proc/stat; busy excludes idle, iowait
    and nice (lower-priority work yields to ours). None where there is no /proc/stat."""
    try:
        lines = Path(stat).read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            busy += user + system + irq + softirq + steal
            total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def busy_cores(cpus: set[int], seconds: float = 0.25) -> float | None:
    """How many of `cpus` other processes keep busy now (ours is idle while it asks)."""
    before = cpu_times(cpus)
    time.sleep(seconds)
    after = cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def usable_cores(env=os.environ) -> tuple[int, str]:
    """The cores this process may use, and how that was decided (for the log)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    affinity, ranks = len(cpus), local_ranks(env)
    busy = busy_cores(cpus)
    free = affinity if busy is None else max(1, affinity - round(busy))
    cores = max(1, free // ranks)
    reasons = [f"affinity {affinity}" + (f", {busy:.1f} busy with other processes" if busy and round(busy) else "")
               + (f" / {ranks} local ranks" if ranks > 1 else "")]
    for name in LIMITS:
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            cores = min(cores, int(value))
            reasons.append(f"{name}={value}")
    return cores, ", ".join(reasons)


def set_intra_op_threads(data_workers: int, env=os.environ) -> int:
    """Set torch's intra-op threads to the usable cores minus the data workers (at least 1)."""
    cores, how = usable_cores(env)
    threads = max(1, cores - data_workers)
    torch.set_num_threads(threads)
    log.info("torch intra-op threads: %d (%d usable cores: %s; minus %d data workers)", threads, cores, how,
             data_workers)
    return threads
