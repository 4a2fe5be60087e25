"""Pretraining runs under DeepSpeed: ZeRO stages across world sizes, kill/resume/export with
MLflow, launchers, lost ranks, the probes, and a run on damaged shards."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import yaml

from helpers import ENV, ROOT, train_config, write_sample_shards
from vilbert.train import checkpoint
from vilbert.train.tracking import read_metrics

LOSS_TOLERANCE = 1e-5  # relative, per step: fp32 all-reduce order differs between 1 and 2 ranks


# --- DeepSpeed runs ---------------------------------------------------------------------------
def test_zero_stages_with_two_ranks_match_one_rank(tmp_path):
    script = str(ROOT / "tests/support/zero_equivalence.py")
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, script, str(tmp_path / "one" / "out.json")], check=True, env=ENV, cwd=tmp_path)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script,
                    str(tmp_path / "two" / "out.json")], check=True, env=ENV, cwd=tmp_path)
    one = json.loads((tmp_path / "one" / "out.json").read_text())
    two = json.loads((tmp_path / "two" / "out.json").read_text())
    for stage in "0123":
        assert len(one[stage]["losses"]) == len(two[stage]["losses"]) == 4
        assert one[stage]["losses"][-1] < one[stage]["losses"][0]  # it trains
        for a, b in zip(one[stage]["losses"], two[stage]["losses"]):
            assert abs(a - b) <= LOSS_TOLERANCE * abs(a), (stage, one[stage]["losses"], two[stage]["losses"])
        # the exported save_pretrained model gives the engine's outputs (after a 2-rank ZeRO-3 run too)
        assert one[stage]["export_diff"] <= 1e-5 and two[stage]["export_diff"] <= 1e-5


def test_kill_resume_export_and_mlflow(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 30, "global_batch_size": 16}, data={"batch_size": 16},
                         checkpoint={"every_steps": 10})
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)]
    process = subprocess.Popen(command, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while not any(m["step"] >= 12 for m in read_metrics(run_dir)):
        assert process.poll() is None and time.time() < deadline, "training died or hung before step 12"
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)  # between the checkpoints of steps 10 and 20
    process.wait()
    killed = {m["step"]: m for m in read_metrics(run_dir)}
    assert checkpoint.complete_tags(run_dir / "checkpoints") == ["step00000010"], max(killed)

    subprocess.run(command + ["--resume", "auto"], check=True, env=ENV, cwd=ROOT, capture_output=True)
    resumed = read_metrics(run_dir)[-20:]
    assert [m["step"] for m in resumed] == list(range(11, 31))  # continued after the last complete step
    assert resumed[0]["train/lr"] == pytest.approx(killed[11]["train/lr"], rel=1e-9)  # same schedule position
    assert resumed[1]["train/lr"] == pytest.approx(killed[12]["train/lr"], rel=1e-9)
    assert checkpoint.complete_tags(run_dir / "checkpoints")[-1] == "step00000030"

    # export, from the CLI, loads with from_pretrained; the run also exported its final model
    from vilbert import ViLBERTForPretraining

    subprocess.run([sys.executable, "-m", "vilbert", "export", str(run_dir / "checkpoints"), str(tmp_path / "exp")],
                   check=True, env=ENV, cwd=ROOT, capture_output=True)
    exported = ViLBERTForPretraining.from_pretrained(tmp_path / "exp")
    final = ViLBERTForPretraining.from_pretrained(run_dir / "model")
    assert all((a == b).all() for a, b in zip(exported.state_dict().values(), final.state_dict().values()))

    # MLflow: one run for the killed and the resumed attempt, each step once
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["world_size"] == "1"
    assert run.data.params["launcher"] == "python" and len(run.data.params["git_commit"]) > 0
    assert run.data.params["model.kernels"] == "apex" and run.data.params["model.kernels_used"] == "none"  # CPU
    assert run.data.params["deepspeed.zero_optimization"] == "{'stage': 1}"
    assert run.data.tags["starts"] == "2" and run.data.tags["resumed_from_step"] == "10"
    for name in ("train/loss", "train/mlm_loss", "train/region_loss", "train/alignment_loss", "train/lr",
                 "train/grad_norm", "train/samples_per_s", "train/tokens_per_s", "train/data_wait_fraction",
                 "val/alignment_accuracy"):
        assert name in run.data.metrics, name
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 31))
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, 31))
    assert "model" in [a.path for a in client.list_artifacts(run.info.run_id)]


def test_a_dead_tracking_server_does_not_stop_training(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 3}, tracking={"uri": "http://127.0.0.1:9"})
    result = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MLflow start failed" in result.stderr
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "train/loss" in m] == [1, 2, 3]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()


def test_the_deepspeed_launcher_runs_two_cpu_processes(tmp_path, toy_world):
    """The README's CPU equivalent of the 8-GPU command."""
    config = train_config(tmp_path, toy_world, optim={"steps": 2, "global_batch_size": 16}, eval={"shards": ""})
    result = subprocess.run(["deepspeed", "--num_gpus", "2", "--module", "vilbert", "pretrain", "--config",
                             str(config)], env={**ENV, "DS_ACCELERATOR": "cpu"}, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "deepspeed"
    assert run.data.params["deepspeed.gradient_accumulation_steps"] == "1"  # 16 = 8 per rank x 2 ranks
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_deepspeed_hostfile_across_two_nodes_without_ssh(tmp_path, toy_world):
    """The multi-node form for clusters without a scheduler, one `deepspeed` per node (here both
    on this machine): `--hostfile` lists the nodes, `--no_ssh --node_rank N` starts node N's
    ranks, `--master_addr` is node 0."""
    config = train_config(tmp_path, toy_world, optim={"steps": 2, "global_batch_size": 16}, eval={"shards": ""})
    (tmp_path / "hostfile").write_text("node-a slots=1\nnode-b slots=1\n")
    port = str(29500 + os.getpid() % 1000)
    nodes = [subprocess.Popen(["deepspeed", "--hostfile", str(tmp_path / "hostfile"), "--no_ssh", "--node_rank",
                               str(rank), "--master_addr", "127.0.0.1", "--master_port", port, "--module", "vilbert",
                               "pretrain", "--config", str(config)], env={**ENV, "DS_ACCELERATOR": "cpu"}, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "deepspeed"
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]


def test_pretraining_reports_the_probes_and_trains_fresh_parameters_at_fresh_lr(tmp_path, toy_world):
    """The toy-world probes run at each evaluation, are logged and printed at the end; with no
    BERT every parameter is fresh, so DeepSpeed steps them at optim.fresh_lr."""
    config = train_config(tmp_path, toy_world, optim={"steps": 4, "lr": 1e-4, "fresh_lr": 3e-4, "warmup_fraction": 0},
                          eval={"probe_images": 6, "retrieval_queries": 3, "every_steps": 2})
    result = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV,
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "grounding, masked colour:" in result.stdout and "zero-shot retrieval, own caption among 100" in \
        result.stdout, result.stdout
    metrics = read_metrics(tmp_path / "run")
    evaluated = [m for m in metrics if "val/grounding/colour/own" in m]
    assert [m["step"] for m in evaluated] == [2, 4]
    for m in evaluated:
        assert all(0 <= m[f"val/grounding/{k}/{w}"] <= 1 for k in ("colour", "object") for w in ("own", "other"))
        assert m["val/zero_shot/chance_R1"] == 0.01 and m["val/zero_shot/R1"] in (0, 1 / 3, 2 / 3, 1)
    assert metrics[0]["train/lr"] == pytest.approx(3e-4) and metrics[0]["train/fresh_lr"] == pytest.approx(3e-4)


def _two_ranks_until_step(tmp_path, toy_world, step):
    """A long two-rank torchrun pretraining, once it is past `step`; returns (process, rank 1's PID)."""
    config = train_config(tmp_path, toy_world, optim={"steps": 5000, "global_batch_size": 16}, eval={"shards": ""},
                          checkpoint={"every_steps": 5}, distributed={"heartbeat_s": 6})
    process = subprocess.Popen(["torchrun", "--nproc_per_node", "2", "-m", "vilbert", "pretrain", "--config",
                                str(config)], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    deadline = time.time() + 300
    while not any(m["step"] >= step for m in read_metrics(tmp_path / "run")):
        assert process.poll() is None and time.time() < deadline, process.stderr.read()[-3000:]
        time.sleep(0.1)
    beat = json.loads((tmp_path / "run/.ranks/rank-00001.json").read_text())
    return process, beat["pid"]


@pytest.mark.parametrize("fault", ["hung", "killed"])
def test_a_hung_or_killed_rank_ends_the_job_with_a_line_naming_it(tmp_path, toy_world, fault):
    process, pid = _two_ranks_until_step(tmp_path, toy_world, 6)
    os.kill(pid, signal.SIGSTOP if fault == "hung" else signal.SIGKILL)
    began = time.time()
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        for kill in (lambda: os.killpg(process.pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError):  # already gone
                kill()
    assert process.returncode != 0 and time.time() - began < 60
    named = f"rank 1 on {socket.gethostname()} (PID {pid}, last heard at step "
    assert named in stderr, stderr[-3000:]
    assert ("not heard from for" if fault == "hung" else "has exited") in stderr
    assert "Traceback" not in stderr.split(named)[0].splitlines()[-1]  # the line itself is not a traceback
    assert checkpoint.complete_tags(tmp_path / "run/checkpoints")  # the last checkpoint stands: resume from it


# --- a real run -----------------------------------------------------------------------------------
def test_a_run_on_damaged_shards_counts_them_and_a_run_on_nothing_stops(tmp_path):
    from vilbert.train.tracking import read_metrics

    damaged = tmp_path / "world"
    write_sample_shards(damaged / "train", n_shards=4, per_shard=25, feature_dim=32, num_classes=7)
    write_sample_shards(damaged / "val", n_shards=1, per_shard=20, feature_dim=32, num_classes=7, seed=1)
    shard = damaged / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 3])
    config = train_config(tmp_path, damaged, data={"workers": 1})
    done = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [m for m in read_metrics(tmp_path / "run") if "system/data_lost_samples" in m]
    assert logged and logged[-1]["system/data_lost_samples"] > 1 and "lost in damaged shards" in done.stderr

    for path in (damaged / "train").glob("*.tar"):
        path.write_bytes(b"\0" * 100)
    done = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config), "--overwrite"],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "vilbert pretrain: error:" in done.stderr and str(damaged / "train") in done.stderr
    assert yaml.safe_load(config.read_text())  # the config itself was fine
