"""Directories that appear whole or not at all: written into a hidden sibling
(`.<name>.partial-<pid>`) and renamed into place when complete. A process killed before then
(SIGKILL, a full disk) leaves only the hidden sibling, which the next write into the same
place removes (its process is gone) or names (its process still runs)."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class StagedDirectory:
    """`path`: where to write (`.<name>.partial-<pid>` beside `final`); `commit()` replaces
    `final` with it, `abort()` deletes it. As a context manager: commit on success, abort
    on an exception."""

    def __init__(self, final: str | Path):
        self.final = Path(final)
        self.path = self.final.parent / f".{self.final.name}.partial-{os.getpid()}"
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)

    def _clear_stale(self) -> None:
        for leftover in self.final.parent.glob(f".{self.final.name}.partial-*"):
            pid = leftover.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            if _alive(int(pid)):
                log.warning("%s is being written by process %s as well (its partial copy: %s)", self.final, pid,
                            leftover)
            else:
                log.warning("removing %s: a partial copy of %s left by process %s, which is gone", leftover,
                            self.final, pid)
                shutil.rmtree(leftover, ignore_errors=True)

    def commit(self) -> None:
        if self.final.exists():
            old = self.final.parent / f".{self.final.name}.old-{os.getpid()}"
            self.final.rename(old)
            self.path.rename(self.final)
            shutil.rmtree(old)
        else:
            self.path.rename(self.final)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.abort() if exc[0] is not None else self.commit()
