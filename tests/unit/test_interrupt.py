"""Signals and launchers: a second signal exits at once; launchers are told apart."""

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers import ENV, ROOT
from vilbert.train import checkpoint
from vilbert.train.distributed import launcher_name


class _Engine:
    """Writes checkpoint files as DeepSpeed would; `fail_after` files it dies (a crash mid-save)."""

    def __init__(self, fail_after=None):
        self.fail_after = fail_after

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        for i in range(3):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt("killed during save")
            (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
            (Path(directory) / tag / f"part{i}.pt").write_text(json.dumps(client_state))


def _save(directory, step, keep_last=2):
    return checkpoint.save(_Engine(), directory, {"step": step}, keep_last=keep_last, is_main=True)


def _latest(directory):
    return (directory / checkpoint.LATEST).read_text()


# --- signals ----------------------------------------------------------------------------------
def test_a_second_signal_exits_at_once():
    program = textwrap.dedent("""
        import os, signal, time
        from vilbert.train.interrupt import stop_request
        with stop_request.installed():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            assert stop_request.requested and stop_request.signum == signal.SIGINT
            print("first signal: stop requested", flush=True)
            stop_request.request("a later reason", signal.SIGUSR2)  # the first reason stays
            assert stop_request.reason == "SIGINT"
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            print("still running")
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, env=ENV, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "first signal: stop requested" in result.stdout and "still running" not in result.stdout
    assert "SIGTERM again: exiting now" in result.stderr


def test_launchers_are_told_apart():
    assert launcher_name({"RANK": "0", "TORCHELASTIC_RUN_ID": "x"}) == "torchrun"
    assert launcher_name({"RANK": "0", "CROSS_RANK": "0"}) == "deepspeed"
    assert launcher_name({"RANK": "0", "SUBMITIT_EXECUTOR": "slurm", "SLURM_PROCID": "0"}) == "submitit-slurm"
    assert launcher_name({"RANK": "0", "SUBMITIT_DEBUG_JOB_ID": "DEBUG_1"}) == "submitit-debug"
    assert launcher_name({"RANK": "0"}) == "env"
