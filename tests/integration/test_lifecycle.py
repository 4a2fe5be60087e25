"""A run's life end to end through `vilbert pretrain`: a used directory, SIGTERM and resume,
damaged checkpoints and config checks on resume, an export that fails midway."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import ENV, ROOT, flip_bytes, latest_tag, train_config
from vilbert.train import checkpoint
from vilbert.train.tracking import read_metrics


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
    assert latest_tag(tmp_path / "run" / "checkpoints") == "step00000003"
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


# --- resume end to end ---
def test_resume_survives_a_damaged_checkpoint_and_checks_the_config(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 6}, eval={"shards": ""})
    _pretrain(config)  # checkpoints at steps 3 and 6
    run = tmp_path / "run"
    flip_bytes(run / "checkpoints/step00000006/mp_rank_00_model_states.pt")  # silently resumed before

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
