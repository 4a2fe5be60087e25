"""Bounded waits on other ranks: a hung or dead rank ends the job with one line naming it.

A collective waits for every rank. A rank that dies breaks it at once (the others see a
closed connection); a rank that hangs (SIGSTOP, a stuck node) would hold the others until
the collective timeout (`distributed.timeout_s`, long, since a collective may rightly wait
for rank 0 writing a large checkpoint). So each rank also beats: a thread writes
`<output_dir>/.ranks/rank-N.json` every few seconds and reads the others' beats. A rank
not heard from for `distributed.heartbeat_s` (measured on the reader's own clock, so clocks
need not agree across nodes) is lost: the reader logs one line naming it and its host, and
the process exits with RANK_LOST_EXIT. Nothing is saved then (a checkpoint is collective
and the lost rank holds its part); the run resumes from its last checkpoint, and under
SLURM the job ends so that it can be requeued.

The beats need a directory every node sees, as checkpoints do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

RANKS_DIR = ".ranks"
RANK_LOST_EXIT = 3  # the exit status of a job that lost a rank (vilbert's CLI documents it)


class RankLost(RuntimeError):
    """A collective failed because another rank died or hung."""


def _alive_here(beat: dict) -> bool | None:
    """Whether the beat's process still exists, when it runs on this host (None: elsewhere)."""
    if beat.get("host") != socket.gethostname():
        return None
    try:
        os.kill(beat["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Heartbeat:
    def __init__(self, output_dir: str | Path, rank: int, world_size: int, timeout_s: float,
                 interval_s: float | None = None):
        self.directory = Path(output_dir) / RANKS_DIR
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.interval_s = interval_s or max(0.5, min(10.0, timeout_s / 6))
        self.step = 0  # the step this rank is at, for the line that names a lost rank
        self._beats = 0
        self._seen: dict[int, tuple[int, float, dict]] = {}  # rank -> (beat count, when it last changed, beat)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _path(self, rank: int) -> Path:
        return self.directory / f"rank-{rank:05d}.json"

    def start(self) -> Heartbeat:
        if self.world_size > 1:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._beat()
            now = time.monotonic()
            self._seen = {r: (-1, now, {}) for r in range(self.world_size) if r != self.rank}
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join()
            self._path(self.rank).unlink(missing_ok=True)

    def _beat(self) -> None:
        self._beats += 1
        temporary = self.directory / f".rank-{self.rank:05d}.tmp"
        temporary.write_text(json.dumps({"rank": self.rank, "host": socket.gethostname(), "pid": os.getpid(),
                                         "beat": self._beats, "step": self.step}))
        os.replace(temporary, self._path(self.rank))

    def _read(self) -> None:
        now = time.monotonic()
        for rank, (count, _, beat) in self._seen.items():
            try:
                fresh = json.loads(self._path(rank).read_text())
            except (OSError, ValueError):  # not written yet, or mid-replace on a network file system
                continue
            if fresh.get("beat") != count or fresh.get("pid") != beat.get("pid"):
                self._seen[rank] = (fresh.get("beat"), now, fresh)

    def lost(self) -> list[str]:
        """The ranks that look lost, in words: silent for the timeout, or gone on this host."""
        self._read()
        now, found = time.monotonic(), []
        for rank, (_, since, beat) in sorted(self._seen.items()):
            silent, alive = now - since, _alive_here(beat) if beat else None
            if alive is False or silent > self.timeout_s:
                how = "has exited" if alive is False else f"not heard from for {silent:.0f} s"
                found.append(f"rank {rank} on {beat.get('host', '?')} (PID {beat.get('pid', '?')}, last heard at step "
                             f"{beat.get('step', '?')}) {how}")
        return found

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
                lost = self.lost()
            except OSError as e:  # the shared directory itself failing: say so, keep beating
                log.warning("heartbeat: %s", e)
                continue
            if lost:
                log.error("rank %d (step %d): %s; ending the job (exit %d) so that it can be resumed from its last "
                          "checkpoint", self.rank, self.step, "; ".join(lost), RANK_LOST_EXIT)
                logging.shutdown()
                os._exit(RANK_LOST_EXIT)

    def explain(self, error: BaseException) -> RankLost:
        """A failed collective as one line: which ranks were lost, if the beats tell."""
        deadline = time.monotonic() + 2 * self.interval_s
        lost = self.lost()
        while not lost and time.monotonic() < deadline:  # a rank on another host: wait for its beats to stop
            time.sleep(self.interval_s / 2)
            lost = self.lost()
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first = re.sub(r"^\[[^\]]*\]\s*", "", first)[:120]  # gloo's source location goes
        failed = f"a collective failed on rank {self.rank} at step {self.step} ({first})"
        return RankLost((f"{'; '.join(lost)}: {failed}" if lost else failed) + "; resume from the last checkpoint")
