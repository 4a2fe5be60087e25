"""The callable that every task of a submitted job runs: one `vilbert` command.

It is submitit-checkpointable. On the warning signal that SLURM sends before a time limit
or at a preemption (USR2, `--signal=USR2@<s>` in the sbatch script), submitit calls
`checkpoint()` on global rank 0 and requeues the job with what it returns: this job, one
requeue further. Our handler around submitit's also asks the loop to stop at the next step
boundary, on every rank, and keeps rank 0 alive (submitit would exit it on the spot): SLURM
then sends SIGTERM to every task (the requeue) and SIGKILL `KillWait` seconds later, and in
that grace the loop writes a last checkpoint if one step and a save fit. Whether it does or
not, the requeued job resumes from the newest complete checkpoint (`--resume auto`), so a
preemption loses at most one checkpoint interval. A job requeued from outside (`scontrol
requeue`) also resumes: SLURM_RESTART_COUNT says it was restarted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """The command exited with a non-zero status (submitit records the job as failed)."""


def resumed_argv(argv: list[str]) -> list[str]:
    """The same command continuing its run: `--resume auto`, and no `--overwrite` (which
    would delete what the interrupted attempt wrote)."""
    command, rest, kept = argv[0], argv[1:], []
    skip_value = False
    for arg in rest:
        if skip_value:
            skip_value = False
        elif arg == "--resume":
            skip_value = True
        elif not arg.startswith("--resume=") and arg != "--overwrite":
            kept.append(arg)
    return [command, "--resume", "auto", *kept]


@dataclasses.dataclass
class VilbertJob:
    argv: list[str]  # the vilbert command line, e.g. ["pretrain", "--config", "configs/paper.yaml"]
    resumable: bool  # the command takes --resume (training commands do)
    max_requeues: int = 3
    requeues: int = 0  # done so far by checkpoint(); a requeue from outside counts in SLURM_RESTART_COUNT
    _requeue_refused = False  # not a field: set on rank 0 when submitit did not requeue (requeues used up)

    def __call__(self) -> int:
        import submitit

        from vilbert import cli
        from vilbert.train.interrupt import stop_request

        # RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR (the first host of the node list), MASTER_PORT
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        restarted = self.requeues > 0 or int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
        argv = resumed_argv(self.argv) if restarted and self.resumable else self.argv
        warning = self._forward_warning_signal(stop_request)
        log.info("running: vilbert %s", " ".join(argv))
        errors: list[str] = []
        status = cli.main(argv, errors)
        if status == 128 + warning and not self._requeue_refused:
            log.info("stopped on %s after a checkpoint; the requeued job resumes from it (rank 0 requeues, "
                     "unless --max-requeues is used up: see its log)", signal.Signals(warning).name)
            return status
        if status != 0:
            raise JobFailed(errors[-1] if errors else f"vilbert {' '.join(argv)} exited with status {status}")
        return status

    def checkpoint(self, *args, **kwargs):
        """Called by submitit on rank 0 at the warning signal: what to requeue (None: don't)."""
        from submitit.helpers import DelayedSubmission

        if self.requeues >= self.max_requeues:
            log.warning("not requeued: %d requeues already (--max-requeues %d)", self.requeues, self.max_requeues)
            return None
        return DelayedSubmission(dataclasses.replace(self, requeues=self.requeues + 1))

    def _forward_warning_signal(self, stop_request) -> int:
        """Wrap submitit's handler of the warning signal; returns the signal's number."""
        from submitit.core.job_environment import JobEnvironment
        from submitit.core.utils import UncompletedJobError

        signum = getattr(signal, "SIG" + JobEnvironment.USR_SIG)
        submitit_handler = signal.getsignal(signum)  # rank 0: checkpoint() + `scontrol requeue`, then exit

        def on_warning(number, frame):
            stop_request.request(f"{signal.Signals(number).name} (time limit or preemption)", number)
            if not callable(submitit_handler):
                return
            try:
                submitit_handler(number, frame)
            except SystemExit:  # keep running: the loop stops at the step boundary, after a checkpoint
                pass
            except UncompletedJobError as e:
                self._requeue_refused = True
                log.warning("%s; stopping after a checkpoint", e)

        signal.signal(signum, on_warning)
        return signum
