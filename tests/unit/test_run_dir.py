"""The output directory: refuse, resume, overwrite, branch; one writer at a time."""

import os
import subprocess
import sys

import pytest

from helpers import ENV, ROOT, latest_tag, save_fake_checkpoint
from vilbert.train import checkpoint, run_dir
from vilbert.train.config import load_config


# --- the output directory: refuse, resume, overwrite, branch ---------------------------------------
def _config(tmp_path):
    return load_config(None, [f"output_dir={tmp_path / 'run'}"])


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tmp_path):
    config = _config(tmp_path)
    assert run_dir.plan(config, "none", False) == run_dir.Start(None, resumed=False)  # empty: fine
    assert run_dir.plan(config, "auto", False) == run_dir.Start(None, resumed=True)  # nothing to resume: step 0
    save_fake_checkpoint(config.checkpoint_dir, 10)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 10}\n')
    with pytest.raises(run_dir.RunExists, match="--resume auto.*--overwrite"):
        run_dir.plan(config, "none", False)
    with pytest.raises(ValueError, match="one of them"):
        run_dir.plan(config, "auto", True)
    start = run_dir.plan(config, "auto", False)
    assert (start.tag, start.step, start.resumed, start.branched) == ("step00000010", 10, True, False)

    start = run_dir.plan(config, "none", True)
    run_dir.prepare(config, start, overwrite=True)
    assert not config.checkpoint_dir.exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert run_dir.plan(config, "none", False) == run_dir.Start(None, resumed=False)


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(tmp_path):
    config = _config(tmp_path)
    for step in (10, 20, 30):
        save_fake_checkpoint(config.checkpoint_dir, step, keep_last=5)
    start = run_dir.plan(config, "step00000010", False)
    assert start.branched and start.step == 10
    run_dir.prepare(config, start, overwrite=False)
    assert checkpoint.complete_tags(config.checkpoint_dir) == ["step00000010"]
    assert latest_tag(config.checkpoint_dir) == "step00000010"
    aside = list((config.checkpoint_dir / run_dir.DISCARDED).glob("*/step*"))
    assert sorted(p.name for p in aside) == ["step00000020", "step00000030"]  # kept, not deleted


# --- one writer per output directory ----------------------------------------------------------------
def test_a_second_start_into_a_directory_being_written_is_refused(tmp_path):
    import socket
    import threading

    first = run_dir.lock(tmp_path, slurm_job="42")
    with pytest.raises(run_dir.RunLocked, match=f"{tmp_path} is being written .*{socket.gethostname()} PID "
                                                f"{os.getpid()}, SLURM job 42"):
        run_dir.lock(tmp_path)
    with pytest.raises(run_dir.RunLocked):  # the same job waits for its earlier self, but not for ever
        run_dir.lock(tmp_path, slurm_job="42", wait_s=0.3)
    threading.Timer(0.5, first.close).start()  # a requeue racing its old self: takes over once it lets go
    run_dir.lock(tmp_path, slurm_job="42", wait_s=30).close()


def test_a_killed_holder_never_blocks_the_next_start(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from vilbert.train import run_dir; "
                               f"h = run_dir.lock({str(tmp_path)!r}); print('held', flush=True); time.sleep(60)"],
                              env=ENV, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(run_dir.RunLocked, match=f"PID {holder.pid}"):
        run_dir.lock(tmp_path)
    holder.kill()
    holder.wait()
    run_dir.lock(tmp_path).close()  # the kernel released it
