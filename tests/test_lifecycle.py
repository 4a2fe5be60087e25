"""A run's life, the same under every launcher: a directory that already holds a run, tags
in step order, `latest`, the lr schedule across resumes, signals, the launcher's name."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from helpers import ENV, ROOT, train_config
from vilbert.train import checkpoint, run_dir
from vilbert.train.config import OptimConfig, load_config
from vilbert.train.distributed import launcher_name
from vilbert.train.optim import retarget_schedule, warmup_linear_decay
from vilbert.train.tracking import read_metrics


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


# --- checkpoints: step order, retention, latest ------------------------------------------------
def test_tags_are_ordered_by_step_number(tmp_path):
    for step in (100_000_000, 9, 10):  # the first name sorts before the others as a string
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / checkpoint.MARKER).write_text("{}")
    (tmp_path / "step00000011").mkdir()  # incomplete: no marker
    assert checkpoint.complete_tags(tmp_path) == ["step00000009", "step00000010", "step100000000"]
    assert checkpoint.resume_tag(tmp_path, "auto") == "step100000000"
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        checkpoint.tag_step("best")


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step)
    assert checkpoint.complete_tags(tmp_path) == ["step00000002", "step00000003"]  # retention
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_Engine(fail_after=2), tmp_path, {"step": 4}, keep_last=2, is_main=True)
    assert (tmp_path / "step00000004").is_dir()  # partial files are there ...
    assert _latest(tmp_path) == "step00000003"  # ... but nothing points at them
    assert checkpoint.resume_tag(tmp_path, "auto") == "step00000003"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint.resume_tag(tmp_path, "step00000004")


def test_latest_always_names_a_kept_checkpoint(tmp_path):
    for step in (1, 2, 3):
        _save(tmp_path, step, keep_last=1)
        assert checkpoint.complete_tags(tmp_path) == [checkpoint.tag_for(step)] == [_latest(tmp_path)]
    # a stale partial save of the next step (an interrupted attempt) is replaced, not mixed with
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "stale_rank7.pt").write_text("old")  # from a larger world size
    _save(tmp_path, 4, keep_last=2)
    assert not (tmp_path / "step00000004" / "stale_rank7.pt").exists()
    assert checkpoint.complete_tags(tmp_path) == ["step00000003", "step00000004"]
    assert (tmp_path / _latest(tmp_path)).is_dir()


# --- damaged checkpoints: verified before use, the newest sound one resumed -------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


def _flip_bytes(path):  # same size, 64 bytes changed: only the digest sees it
    data = bytearray(path.read_bytes())
    for i in range(0, min(len(data), 64)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("harm, why", [(_truncate, "bytes, .* when written"), (_zero_fill, "SHA-256"),
                                       (Path.unlink, "is missing"), (_flip_bytes, "SHA-256")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_sound_one(tmp_path, harm, why):
    config = _config(tmp_path)
    for step in (10, 20, 30):
        _save(config.checkpoint_dir, step, keep_last=5)
    harm(config.checkpoint_dir / "step00000030" / "part1.pt")
    start = run_dir.plan(config, "auto", False)
    assert (start.tag, start.branched) == ("step00000020", True)
    assert list(start.damaged) == ["step00000030"] and __import__("re").search(why, start.damaged["step00000030"])
    run_dir.prepare(config, start, overwrite=False)
    assert checkpoint.complete_tags(config.checkpoint_dir) == ["step00000010", "step00000020"]
    assert (config.checkpoint_dir / checkpoint.DAMAGED / "step00000030" / "part0.pt").exists()  # kept for a look
    assert _latest(config.checkpoint_dir) == "step00000020"
    with pytest.raises(checkpoint.DamagedCheckpoint, match="step00000010 .* is damaged: part0.pt is missing"):
        (config.checkpoint_dir / "step00000010" / "part0.pt").unlink()
        checkpoint.resume_from(config.checkpoint_dir, "step00000010")  # named: no fallback


def test_every_checkpoint_damaged_stops_with_a_named_error(tmp_path):
    for step in (1, 2):
        _save(tmp_path, step)
        _zero_fill(tmp_path / checkpoint.tag_for(step) / "part0.pt")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"every checkpoint .* \(step00000002: .*--overwrite"):
        checkpoint.resume_from(tmp_path, "auto")
    (tmp_path / "step00000003").mkdir()  # a marker from before digests: the state alone, taken as it is
    (tmp_path / "step00000003" / checkpoint.MARKER).write_text('{"step": 3}')
    assert checkpoint.resume_from(tmp_path, "auto") == checkpoint.ResumePoint("step00000003", {})


# --- the output directory: refuse, resume, overwrite, branch ---------------------------------------
def _config(tmp_path):
    return load_config(None, [f"output_dir={tmp_path / 'run'}"])


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tmp_path):
    config = _config(tmp_path)
    assert run_dir.plan(config, "none", False) == run_dir.Start(None, resumed=False)  # empty: fine
    assert run_dir.plan(config, "auto", False) == run_dir.Start(None, resumed=True)  # nothing to resume: step 0
    _save(config.checkpoint_dir, 10)
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
        _save(config.checkpoint_dir, step, keep_last=5)
    start = run_dir.plan(config, "step00000010", False)
    assert start.branched and start.step == 10
    run_dir.prepare(config, start, overwrite=False)
    assert checkpoint.complete_tags(config.checkpoint_dir) == ["step00000010"]
    assert _latest(config.checkpoint_dir) == "step00000010"
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


# --- the lr schedule across resumes --------------------------------------------------------------
def _lrs(scheduler, steps):
    out = []
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(scheduler.get_last_lr()[0])
    return out


def _scheduler(steps, state=None):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    scheduler = warmup_linear_decay(optimizer, OptimConfig(steps=steps, lr=1.0, warmup_fraction=0.1))
    if state is not None:
        scheduler.load_state_dict(state)
    return scheduler


def test_a_resume_with_the_same_steps_continues_the_schedule_exactly():
    whole = _lrs(_scheduler(100), 100)
    first = _scheduler(100)
    before = _lrs(first, 40)
    resumed = _scheduler(100, first.state_dict())  # the checkpoint carries the schedule
    retarget_schedule(resumed, 100, 40)
    assert before + _lrs(resumed, 60) == whole


def test_a_resume_with_more_steps_decays_from_where_it_was_to_the_new_end():
    first = _scheduler(100)
    before = _lrs(first, 40)
    resumed = _scheduler(200, first.state_dict())  # a config asking for 200 steps now
    assert resumed.lr_lambdas[0].total == 100  # the checkpoint's schedule came back with it
    retarget_schedule(resumed, 200, 40)
    after = _lrs(resumed, 160)
    step = before[-1] - before[-2]  # the decay per step before the resume
    assert abs(after[0] - before[-1]) <= abs(step) * 0.6  # no jump: at most a (gentler) decay step
    assert all(b < a for a, b in zip(after, after[1:]))  # decaying ...
    assert after[-1] == 0.0 and after[-2] > 0.0  # ... to zero exactly at the new end
    # resumed inside the warmup: the warmup completes, then the decay ends at the new total
    warm = _scheduler(100)
    _lrs(warm, 5)
    longer = _scheduler(300, warm.state_dict())
    retarget_schedule(longer, 300, 5)
    lrs = _lrs(longer, 295)
    assert max(lrs) == pytest.approx(1.0) and lrs[-1] == 0.0
    # ... unless the new total ends before the warmup would: then it decays from where it was
    shorter = _scheduler(8, warm.state_dict())
    retarget_schedule(shorter, 8, 5)
    assert _lrs(shorter, 3) == pytest.approx([0.6 * 2 / 3, 0.6 / 3, 0.0])  # 0.6 = 6/10 of the warmup


def test_extending_a_finished_schedule_is_refused():
    done = _scheduler(100)
    _lrs(done, 100)
    extended = _scheduler(150, done.state_dict())
    with pytest.raises(ValueError, match="decayed to 0"):
        retarget_schedule(extended, 150, 100)


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


# --- the same, end to end through `vilbert pretrain` -------------------------------------------
def _pretrain(config, *extra, check=True):
    result = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config), *extra],
                            env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert not check or result.returncode == 0, result.stderr[-3000:]
    return result


def test_rerunning_into_a_used_directory(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 10}, checkpoint={"every_steps": 10})
    _pretrain(config)
    again = _pretrain(train_config(tmp_path, toy_world, optim={"steps": 3}, checkpoint={"every_steps": 3}),
                      check=False)
    assert again.returncode == 2 and "--resume auto" in again.stderr and "--overwrite" in again.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == list(range(1, 11))  # untouched

    _pretrain(tmp_path / "config.yaml", "--overwrite")  # the 3-step config
    assert checkpoint.complete_tags(tmp_path / "run" / "checkpoints") == ["step00000003"]
    assert _latest(tmp_path / "run" / "checkpoints") == "step00000003"
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                              order_by=["attributes.start_time DESC"])
    assert len(runs) == 2  # the overwritten run stays in MLflow, the new one is apart
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] == [1, 2, 3]


def test_sigterm_checkpoints_then_resume_runs_longer(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 400}, checkpoint={"every_steps": 1000},
                          eval={"shards": ""}, data={"workers": 1})
    run = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV,
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + 300
    while not any(m["step"] >= 45 for m in read_metrics(run)):  # past the warmup (40 steps)
        assert process.poll() is None and time.time() < deadline, "training died or hung before step 45"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGTERM)  # the whole process group, data worker included, as SLURM does
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = read_metrics(run)[-1]["step"]
    assert stopped < 400 and "continue with --resume auto" in stderr
    assert checkpoint.complete_tags(run / "checkpoints") == [checkpoint.tag_for(stopped)]  # written at the stop

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = json.loads((run / "tracking.json").read_text())["run_id"]
    assert client.get_run(run_id).info.status == "KILLED"
    before = {m["step"]: m["train/lr"] for m in read_metrics(run)}

    longer = train_config(tmp_path, toy_world, optim={"steps": stopped + 20}, checkpoint={"every_steps": 1000},
                          eval={"shards": ""})
    _pretrain(longer, "--resume", "auto")
    after = {m["step"]: m["train/lr"] for m in read_metrics(run)}
    assert list(after) == list(range(1, stopped + 21))
    assert all(after[s] == before[s] for s in before)
    # no jump: from the lr it had at the stop, linearly to 0 over the 20 new steps
    assert after[stopped + 1] == pytest.approx(before[stopped] * 19 / 20, rel=1e-9)
    assert after[stopped + 20] == 0.0
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == list(range(1, stopped + 21))


# --- parameter groups: a higher lr for the parameters that start fresh ------------------------------
def test_fresh_parameters_get_fresh_lr_and_loaded_ones_lr():
    from vilbert import ViLBERTConfig, ViLBERTForPretraining
    from vilbert.train.optim import parameter_groups

    model = ViLBERTForPretraining(ViLBERTConfig.from_preset("tiny"))
    names = dict(model.named_parameters())
    loaded = frozenset(k for k in model.state_dict() if ".text_" in k or k == "heads.mlm.decoder.weight")
    groups = parameter_groups(model, OptimConfig(lr=1e-4, fresh_lr=1e-3, weight_decay=0.01), loaded)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(names)  # each parameter once
    words = names["vilbert.text_embeddings.word_embeddings.weight"]  # tied to heads.mlm.decoder.weight
    assert by_id[id(words)]["lr"] == 1e-4 and by_id[id(words)]["weight_decay"] == 0.01
    assert by_id[id(names["vilbert.encoder.text_layers.0.attention.query.bias"])]["lr"] == 1e-4
    for name in ("vilbert.region_embeddings.feature.weight", "heads.alignment.weight"):
        assert by_id[id(names[name])]["lr"] == 1e-3, name
    assert by_id[id(names["heads.alignment.bias"])]["weight_decay"] == 0.0
    assert groups[0]["lr"] == 1e-4 and groups[-1]["lr"] == 1e-3  # train/lr and train/fresh_lr read these
    same = parameter_groups(model, OptimConfig(lr=1e-4, fresh_lr=0.0), loaded)
    assert {g["lr"] for g in same} == {1e-4}


def test_resume_survives_a_damaged_checkpoint_and_checks_the_config(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 6}, eval={"shards": ""})
    _pretrain(config)  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    _flip_bytes(run / "checkpoints/step00000006/mp_rank_00_model_states.pt")  # silently resumed before

    changed = _pretrain(config, "--resume", "auto", "model.preset=small", check=False)
    assert changed.returncode == 1 and "model.preset tiny -> small" in changed.stderr, changed.stderr[-2000:]
    assert "num_hidden_layers" in changed.stderr and "vilbert export" in changed.stderr
    zero = _pretrain(config, "--resume", "auto", "deepspeed=" + str(ROOT / "deepspeed_configs/zero2_fp32.json"),
                     check=False)
    assert zero.returncode == 1 and "zero_stage 1 -> 2" in zero.stderr and "deepspeed " in zero.stderr

    longer = train_config(tmp_path, toy_world, optim={"steps": 9, "lr": 2e-3}, eval={"shards": ""})
    resumed = _pretrain(longer, "--resume", "auto")
    assert "checkpoint step00000006 is damaged (mp_rank_00_model_states.pt does not match its SHA-256" \
        in resumed.stderr
    assert "resumed from" in resumed.stderr and "step00000003 at step 3" in resumed.stderr
    assert "resume: optim.lr 0.001 -> 0.002" in resumed.stderr and "resume: optim.steps 6 -> 9" in resumed.stderr
    assert (run / "checkpoints/damaged/step00000006").is_dir()
    assert [m["step"] for m in read_metrics(run)] == list(range(1, 10))
    assert max(m["train/loss"] for m in read_metrics(run)) < 20  # the damaged weights were never loaded


def test_an_export_that_fails_midway_leaves_the_previous_model(tmp_path, monkeypatch):
    from vilbert import ViLBERTConfig, ViLBERTForPretraining

    model = ViLBERTForPretraining(ViLBERTConfig.from_preset("tiny"))
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step00000001").mkdir(parents=True)
    torch.save({"module": model.state_dict()}, checkpoints / "step00000001/mp_rank_00_model_states.pt")
    (checkpoints / "step00000001" / checkpoint.MARKER).write_text(json.dumps(
        {"state": {"step": 1}, "files": checkpoint.file_digests(checkpoints / "step00000001")}))
    model.config.to_json_file(checkpoints / checkpoint.MODEL_CONFIG)
    (checkpoints / checkpoint.MODEL_CLASS).write_text("ViLBERTForPretraining")
    checkpoint.export(checkpoints, tmp_path / "model")
    before = sorted(p.name for p in (tmp_path / "model").iterdir())

    def disk_full(self, out, **kwargs):
        (Path(out) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(ViLBERTForPretraining, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.export(checkpoints, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial copy left
