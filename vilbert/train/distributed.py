"""Process-group setup that works under every launcher.

`python`, `torchrun`, `deepspeed`, `srun` and our SLURM front-end (submitit) all end up
here; they differ only in which environment variables say who is who:

- torchrun and the deepspeed launcher: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
  (told apart by TORCHELASTIC_RUN_ID and deepspeed's CROSS_RANK);
- submitit (`launch/slurm.py`): the same variables, exported in each task from SLURM's by
  `submitit.helpers.TorchDistributedEnvironment`; SUBMITIT_EXECUTOR names the cluster;
- srun: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, and the first host of SLURM_JOB_NODELIST
  as the rendezvous;
- plain `python`: one process; we set the variables ourselves, so DeepSpeed never falls
  back to mpi4py discovery.
"""

from __future__ import annotations

import os
import socket
import subprocess
import warnings
from dataclasses import dataclass

from vilbert.config_schema import positive


@dataclass
class DistributedConfig:
    timeout_s: float = positive(1800.0)  # a collective waiting longer fails (gloo, NCCL); a big save may rightly wait
    heartbeat_s: float = positive(120.0)  # a rank silent this long (hung or dead) ends the job (heartbeat.py)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    launcher: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST", os.environ.get("SLURM_NODELIST", ""))
    try:
        return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return nodelist.split(",")[0] or "127.0.0.1"


def discover() -> DistEnv:
    """Fill in the torch.distributed rendezvous variables from whichever launcher ran us."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = launcher_name(env)
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        launcher = "slurm"
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
        env.setdefault("MASTER_ADDR", _first_slurm_host())
        # A port derived from the job id: every task computes the same one.
        env.setdefault("MASTER_PORT", str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000))
    else:
        launcher = "python"
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", "29500")
    return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]), launcher)


def launcher_name(env) -> str:
    """Which launcher set RANK and WORLD_SIZE."""
    if env.get("SUBMITIT_EXECUTOR"):
        return f"submitit-{env['SUBMITIT_EXECUTOR']}"
    if "SUBMITIT_DEBUG_JOB_ID" in env:  # submitit's in-process executor
        return "submitit-debug"
    if "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if "CROSS_RANK" in env:
        return "deepspeed"
    return "env"  # RANK/WORLD_SIZE set by something else


def slurm_job() -> dict | None:
    """The SLURM job this process runs in: id, node list, how often it was requeued."""
    env = os.environ
    if "SLURM_JOB_ID" not in env:
        return None
    job_id = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if "SLURM_ARRAY_TASK_ID" in env
              else env["SLURM_JOB_ID"])
    return {"job_id": job_id, "nodelist": env.get("SLURM_JOB_NODELIST", ""),
            "restarts": int(env.get("SLURM_RESTART_COUNT", "0") or 0)}


def select_accelerator() -> str:
    """'cuda' when a GPU is visible, else 'cpu' (then DeepSpeed's CPU accelerator and gloo).
    Must run before deepspeed is imported."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cpu"


def init_distributed(timeout_s: float = 1800.0) -> tuple[DistEnv, str]:
    """The process group, whose collectives fail after `timeout_s` instead of waiting for ever."""
    from datetime import timedelta

    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a failed NCCL collective raises, not hangs
    device_type = select_accelerator()
    env = discover()
    import deepspeed
    import torch

    if device_type == "cuda":
        torch.cuda.set_device(env.local_rank)
    # DeepSpeed's ZeRO calls a torch collective that torch marks deprecated: once per rank and
    # step, and nothing a user can act on.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                               timeout=timedelta(seconds=timeout_s))
    return env, device_type


def from_rank0(value):
    """Rank 0's `value` on every rank (a decision only rank 0 can make, such as taking a lock)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def is_collective_failure(error: BaseException) -> bool:
    """Whether `error` is a collective that failed (a peer gone, a timeout), not a bug of ours."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(word in text for word in (
        "gloo", "nccl", "connection reset", "connection closed", "timed out", "broken pipe"))
