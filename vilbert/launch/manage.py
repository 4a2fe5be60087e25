"""Following a submitted job: its state, its rank-0 log, and a graceful cancel.

The logs are submitit's, `<log-dir>/<job>/<job>_0_log.out` and `.err` for rank 0 (training's
progress and logging go to `.err`); SLURM reports their paths while it knows the job, and
the log directory is searched after that (slurmctld forgets finished jobs after MinJobAge,
and `sacct` needs slurmdbd, which many small clusters do not run).
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                 "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "PREEMPTED"}
CAUSE = re.compile(r"^vilbert [\w-]+: (error: )?")  # the one line a failed command prints (vilbert.cli)
SHOWN = ("JobId", "JobName", "JobState", "Reason", "RunTime", "TimeLimit", "NumNodes", "NumTasks", "NodeList",
         "Restarts", "ExitCode", "StdErr")


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job` as a dict; empty when SLURM no longer knows the job."""
    result = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        return {}
    info = {}
    for field in result.stdout.split():
        key, sep, value = field.partition("=")
        if sep:
            info[key] = value
    return info


def log_files(job_id: str, log_dir: str, info: dict[str, str]) -> list[Path]:
    """Rank 0's stdout and stderr: where SLURM (`info`) says, else in the log directory."""
    if info.get("StdOut"):
        paths = [Path(info["StdOut"]), Path(info.get("StdErr") or info["StdOut"])]
    else:
        folder = Path(log_dir) / job_id
        paths = [folder / f"{job_id}_0_log.out", folder / f"{job_id}_0_log.err"]
    return list(dict.fromkeys(paths))


def screen_lines(data: bytes) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage-return updates collapse to the last."""
    lines = (line.rsplit("\r", 1)[-1] for line in data.decode(errors="replace").split("\n"))
    return [line for line in lines if line.strip()]


def status(job_id: str, log_dir: str) -> int:
    info = job_info(job_id)
    if not info:
        print(f"job {job_id}: not known to slurmctld (it forgets finished jobs after MinJobAge)")
    for key in SHOWN:
        if key in info:
            print(f"{key:>10}: {info[key]}")
    for path in log_files(job_id, log_dir, info):
        if path.suffix == ".err" and path.exists():
            lines = screen_lines(path.read_bytes())
            causes = [line for line in lines if CAUSE.match(line)]
            if causes:
                print(f"{'cause':>10}: {causes[-1]}")
            print(f"rank 0's log ({path}) ends:")
            print("\n".join(lines[-3:]) or "(empty)")
    return 0 if info else 1


def tail(job_id: str, log_dir: str, lines: int = 20, follow: bool = True, poll_s: float = 1.0) -> int:
    """Print the end of rank 0's logs, then follow them until the job ends (or Ctrl-C)."""
    info = job_info(job_id)
    files = log_files(job_id, log_dir, info)
    offsets: dict[Path, int] = {}
    if not any(p.exists() for p in files) and not info:
        print(f"job {job_id}: no logs in {log_dir}/{job_id} and SLURM does not know it", file=sys.stderr)
        return 1
    for path in files:
        if path.exists():
            data = path.read_bytes()
            print("\n".join(screen_lines(data)[-lines:]), flush=True)
            offsets[path] = len(data)
    try:
        while follow:
            state = job_info(job_id).get("JobState", "UNKNOWN")
            for path in files:
                if path.exists() and path.stat().st_size > offsets.get(path, 0):
                    with path.open("rb") as f:
                        f.seek(offsets.get(path, 0))
                        chunk = f.read()
                    offsets[path] = offsets.get(path, 0) + len(chunk)
                    sys.stdout.write(chunk.decode(errors="replace"))
                    sys.stdout.flush()
            if state not in ACTIVE_STATES:
                print(f"\njob {job_id}: {state}")
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        pass
    return 0


def cancel(job_id: str) -> int:
    """scancel: SLURM sends SIGTERM, the loop writes a checkpoint at the next step boundary,
    and SLURM kills what is left after KillWait."""
    result = subprocess.run(["scancel", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr.strip(), file=sys.stderr)
        return 1
    print(f"cancelled job {job_id}: each task stops at its next step boundary and writes a checkpoint, "
          f"if that fits in the cluster's KillWait (continue it with --resume auto)")
    return 0
