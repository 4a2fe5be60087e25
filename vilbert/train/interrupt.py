"""Stopping a run cleanly.

SIGTERM and SIGINT (a time limit, a cancel, a preemption without requeue, Ctrl-C) ask the
loop to stop at the next step boundary, where every rank writes a checkpoint and the MLflow
run is closed as KILLED; the process then exits with 128 + the signal's number. A second
SIGTERM or SIGINT exits at once. A scheduler's warning signal (submitit's USR2 before a time
limit or a preemption) requests the same stop through `request`; it does not count as a
first signal, so the SIGTERM that follows a requeue does not cut the last checkpoint short.

Signal handlers only set a flag: the loop does the work, on every rank at the same step
(`agreed` is a collective), never inside a handler.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(Exception):
    """The loop stopped early on a signal, after writing its checkpoint."""

    def __init__(self, reason: str, signum: int, step: int):
        super().__init__(f"stopped at step {step} on {reason}; continue with --resume auto")
        self.reason, self.signum, self.step = reason, signum, step

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopRequest:
    def __init__(self):
        self.reason: str | None = None
        self.signum = 0
        self._signals_seen = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Take over SIGTERM and SIGINT (main thread only; idempotent)."""
        if self._previous or threading.current_thread() is not threading.main_thread():
            return
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        self.reason, self.signum, self._signals_seen = None, 0, 0

    @contextmanager
    def installed(self):
        installed_here = not self._previous
        self.install()
        try:
            yield self
        finally:
            if installed_here:
                self.uninstall()

    def request(self, reason: str, signum: int) -> None:
        if self.reason is None:
            self.reason, self.signum = reason, signum

    def _on_signal(self, signum: int, frame) -> None:
        self._signals_seen += 1
        name = signal.Signals(signum).name
        if self._signals_seen > 1:
            os.write(2, f"\n{name} again: exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        os.write(2, f"\n{name}: stopping after this step with a checkpoint ({name} again exits at once)\n".encode())
        self.request(name, signum)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def agreed(self, group=None) -> bool:
        """Collective: True on every rank when any rank was asked to stop, so all ranks stop
        at the same step. `group`: a gloo group, so that this never waits on a GPU stream."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return self.requested
        flag = torch.tensor([float(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        if flag.item() and not self.requested:
            self.request("a stop on another rank", signal.SIGTERM)
        return bool(flag.item())


stop_request = StopRequest()  # signals are process-wide, and so is the request they set
