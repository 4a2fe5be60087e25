"""Signals and launchers: a second signal exits at once; launchers are told apart."""

import signal
import subprocess
import sys
import textwrap

from helpers import ENV, ROOT
from vilbert.train.distributed import launcher_name


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
