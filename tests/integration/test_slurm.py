"""`launch/slurm.py`: its arguments and sbatch script, `--cluster local`, and jobs on a real
SLURM cluster on localhost (tests/slurm_cluster.py): completion, preemption, requeue from
outside, time limit, two nodes."""

import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ENV, ROOT, train_config, write_ablation, write_sample_shards
from slurm_cluster import LocalSlurmCluster, SlurmUnavailable, loopback_host_names
from vilbert.launch import cli
from vilbert.launch.job import resumed_argv
from vilbert.launch.manage import job_info
from vilbert.launch.submit import minutes
from vilbert.train import checkpoint
from vilbert.train.tracking import read_metrics

LAUNCH = [sys.executable, str(ROOT / "launch" / "slurm.py")]
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


# --- arguments and the script: no scheduler needed -------------------------------------------------
def test_dry_run_for_4_nodes_x_8_gpus(tmp_path, capsys, monkeypatch, toy_world):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://login-1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    status = cli.main(["pretrain", "--nodes", "4", "--gpus-per-node", "8", "--cpus-per-task", "10", "--time",
                       "1-00:00:00", "--partition", "gpu", "--sbatch", "mail-type=END", "--log-dir",
                       str(tmp_path / "logs"), "--dry-run", "--config", str(ROOT / "configs/paper.yaml"),
                       "optim.lr=5e-5", "model.bert=minilm", "data.batch_size=16",  # 512 = 16 x 32 ranks
                       f"data.shards={toy_world}/train", f"eval.shards={toy_world}/val"])  # its paths: placeholders
    script = capsys.readouterr().out
    assert status == 0
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --cpus-per-task=10", "#SBATCH --time=1440", "#SBATCH --partition=gpu",
                 "#SBATCH --signal=USR2@90", "#SBATCH --requeue", "#SBATCH --mail-type=END",
                 "export MLFLOW_TRACKING_URI=http://login-1:5000", f"cd {Path.cwd()}", "srun ",
                 "-m submitit.core._submit"):
        assert line in script, line
    assert "hunter2" not in script  # secrets travel through SLURM's own export, never the script
    assert f"each task runs: vilbert pretrain --config {ROOT / 'configs/paper.yaml'} optim.lr=5e-5" in script
    assert not list(tmp_path.rglob("*.pkl"))  # nothing submitted


def test_arguments_pass_through_and_are_checked_before_submission(tmp_path, capsys, toy_world):
    config = train_config(tmp_path, toy_world)
    # `--` hands everything after it to the command, even a name the launcher also has
    assert cli.main(["pretrain", "--dry-run", "--config", str(config), "--", "optim.steps=5"]) == 0
    assert f"vilbert pretrain --config {config} optim.steps=5" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # vilbert pretrain's own parser rejects it, before any submission
        cli.main(["pretrain", "--dry-run", "--config", str(config), "--no-such-option"])
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["finetune-everything", "--dry-run"])
    assert "not a vilbert command that trains or evaluates" in capsys.readouterr().err
    assert cli.main(["pretrain", "--dry-run", "--config", str(config), "optim.learning_rate=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')  # the directory holds a run
    assert cli.main(["pretrain", "--dry-run", "--config", str(config)]) == 2
    assert "not submitted" in capsys.readouterr().err
    assert cli.main(["pretrain", "--dry-run", "--config", str(config), "--resume", "auto"]) == 0


@pytest.mark.parametrize("override, message", [
    ("optim.global_batch_size=24", "optim.global_batch_size=24 is not a multiple of data.batch_size=8 (the micro "
                                   "batch per rank) x world size 2 = 16"),
    ("data.shards=/no/such/set", "/no/such/set: no such shard-set directory"),
    ("eval.shards=/no/such/val", "/no/such/val: no such shard-set directory"),
])
def test_what_would_fail_on_a_compute_node_is_refused_before_submission(tmp_path, capsys, toy_world, override,
                                                                         message):
    config = train_config(tmp_path, toy_world, optim={"global_batch_size": 16})
    assert cli.main(["pretrain", "--dry-run", "--tasks-per-node", "2", "--config", str(config), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("launch/slurm.py: not submitted: ") and message in err, err


def test_a_set_without_class_distributions_is_named_with_the_two_ways_forward(tmp_path, capsys):
    write_sample_shards(tmp_path / "set", n_shards=1, per_shard=10, num_classes=0)
    for split in ("train", "val"):
        (tmp_path / split).symlink_to(tmp_path / "set")
    config = train_config(tmp_path, tmp_path)
    assert cli.main(["pretrain", "--dry-run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "has no detector class distributions (cls_prob)" in err and "cls_prob, or regress" in err
    assert "model.overrides.visual_target=1 model.overrides.v_target_size=8" in err
    assert cli.main(["pretrain", "--dry-run", "--config", str(config), "model.overrides.visual_target=1",
                     "model.overrides.v_target_size=8"]) == 0


def test_a_requeued_command_resumes_and_never_overwrites():
    assert resumed_argv(["pretrain", "--config", "c.yaml", "--overwrite", "optim.lr=1"]) == \
        ["pretrain", "--resume", "auto", "--config", "c.yaml", "optim.lr=1"]
    assert resumed_argv(["pretrain", "--resume", "step00000010", "--config", "c.yaml"]) == \
        ["pretrain", "--resume", "auto", "--config", "c.yaml"]
    assert resumed_argv(["pretrain", "--resume=none"]) == ["pretrain", "--resume", "auto"]


def test_a_sweep_dry_run_lists_the_arrays_and_their_dependencies(tmp_path, capsys, toy_world):
    path = write_ablation(tmp_path, toy_world, axes={"data.fraction": [1.0, 0]})
    assert cli.main(["sweep", str(path), "--tasks-per-node", "1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 cells; 3 job(s) to run in 3 array(s)" in out
    assert "array 0: pretrain, 1 job(s)\n    [0] fraction=1.0/pretrain" in out
    assert "array 1: finetune fraction=1.0, 1 job(s) after fraction=1.0/pretrain (afterok)" in out
    assert "array 2: finetune fraction=0, 1 job(s)\n" in out  # no pretraining: nothing to wait for
    assert "after all 3 array(s) (afterany)" in out
    assert not (tmp_path / "ablation/ablation.json").exists()  # no parent run: nothing submitted
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(path), "--cluster", "local"])
    assert "has no job dependencies: run the ablation with `vilbert ablate" in capsys.readouterr().err


def test_time_limits_in_minutes():
    assert [minutes(t) for t in ("90", "1:30", "02:00:00", "1-0", "1-2:30", "0-00:00:01")] == [90, 2, 120, 1440,
                                                                                                1590, 1]
    with pytest.raises(ValueError, match="--time"):
        minutes("soon")


def _mlflow_run(tmp_path, run_dir):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]  # one run, whatever happened to the job
    assert runs[0].info.run_id == json.loads((run_dir / "tracking.json").read_text())["run_id"]
    return client, runs[0]


def _assert_each_step_once(tmp_path, run_dir, steps):
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, steps + 1))
    client, run = _mlflow_run(tmp_path, run_dir)
    for name in ("train/loss", "train/lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, name)] == list(range(1, steps + 1))
    assert run.info.status == "FINISHED"
    return run


def test_the_local_cluster_runs_the_same_two_task_job(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, optim={"steps": 6, "global_batch_size": 16})
    result = subprocess.run([*LAUNCH, "pretrain", "--cluster", "local", "--tasks-per-node", "2", "--log-dir",
                             str(tmp_path / "logs"), "--config", str(config)], cwd=ROOT, env=ENV,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert re.search(r"job \d+ done", result.stdout)
    run = _assert_each_step_once(tmp_path, tmp_path / "run", 6)
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "submitit-local"


# --- a real SLURM cluster on localhost ---------------------------------------------------------------
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    nodes = 2 if len(loopback_host_names()) >= 2 else 1
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=nodes)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        print(f"\nSLURM tests skipped: {e}", file=sys.stderr)
        pytest.skip(f"SLURM unavailable: {e}")
    yield cluster
    cluster.stop()


def _submit(slurm, config, log_dir, *options) -> str:
    result = subprocess.run([*LAUNCH, "pretrain", "--log-dir", str(log_dir), *options, "--config", str(config)],
                            cwd=ROOT, env={**ENV, **slurm.env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"submitted job (\d+)", result.stdout).group(1)


def _rank0_log(log_dir, job_id) -> str:
    path = log_dir / job_id / f"{job_id}_0_log.err"
    return path.read_text(errors="replace") if path.exists() else "(no log)"


def _wait(job_id: str, log_dir, timeout: float, until=None) -> dict:
    """Poll until the job ends (or `until(info)`); a requeued job starts at once instead of
    after SLURM's fixed requeue delay (about 2 minutes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job_id)
        if info.get("JobState") in DONE or (until and until(info)):
            return info
        if info.get("JobState") == "PENDING" and info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], capture_output=True)
        time.sleep(1)
    pytest.fail(f"job {job_id} still {job_info(job_id).get('JobState')} after {timeout:.0f} s; rank 0's log ends:\n"
                f"{_rank0_log(log_dir, job_id)[-3000:]}")


def _wait_for_step(run_dir, step: int, job_id: str, log_dir, timeout: float = 300) -> None:
    _wait(job_id, log_dir, timeout, until=lambda info: any(m["step"] >= step for m in read_metrics(run_dir)))
    assert any(m["step"] >= step for m in read_metrics(run_dir)), _rank0_log(log_dir, job_id)[-3000:]


@pytest.fixture(scope="module")
def two_task_job(slurm, tmp_path_factory, toy_world):
    tmp_path = tmp_path_factory.mktemp("complete")
    config = train_config(tmp_path, toy_world, optim={"steps": 40, "global_batch_size": 16},
                          checkpoint={"every_steps": 10, "keep_last": 2})
    job_id = _submit(slurm, config, tmp_path / "logs", "--tasks-per-node", "2")
    info = _wait(job_id, tmp_path / "logs", 600)
    return tmp_path, job_id, info


def test_a_two_task_job_completes(two_task_job, capsys):
    tmp_path, job_id, info = two_task_job
    assert info["JobState"] == "COMPLETED", _rank0_log(tmp_path / "logs", job_id)[-3000:]
    assert info["NumTasks"] == "2" and info["Restarts"] == "0"
    run_dir = tmp_path / "run"
    assert checkpoint.complete_tags(run_dir / "checkpoints") == ["step00000030", "step00000040"]
    assert (run_dir / "model" / "model.safetensors").exists()
    run = _assert_each_step_once(tmp_path, run_dir, 40)  # both ranks' steps, averaged and logged by rank 0
    assert run.data.params["world_size"] == "2" and run.data.params["launcher"] == "submitit-slurm"
    assert run.data.tags["slurm.job_ids"] == job_id and run.data.tags["slurm.requeues"] == "0"
    assert run.data.tags["slurm.nodelist"] == info["NodeList"]

    assert cli.main(["status", job_id, "--log-dir", str(tmp_path / "logs")]) == 0
    assert "JobState: COMPLETED" in capsys.readouterr().out
    assert cli.main(["tail", job_id, "--log-dir", str(tmp_path / "logs"), "--no-follow", "--lines", "200"]) == 0
    assert "held-out: alignment accuracy" in capsys.readouterr().out


def _preemptible_config(tmp_path, toy_world, steps):
    """Checkpoints only at the end: the only other one a resume can find is the stop's own. A
    data worker per rank: SLURM signals it too."""
    return train_config(tmp_path, toy_world, optim={"steps": steps, "global_batch_size": 16},
                        checkpoint={"every_steps": 100_000}, eval={"shards": ""}, data={"workers": 1})


def test_a_preempted_job_resumes_from_its_newest_checkpoint_in_the_same_mlflow_run(slurm, tmp_path, toy_world):
    config, logs, run_dir = _preemptible_config(tmp_path, toy_world, 200), tmp_path / "logs", tmp_path / "run"
    job_id = _submit(slurm, config, logs, "--tasks-per-node", "2")
    _wait_for_step(run_dir, 20, job_id, logs)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, env=slurm.env)  # what a preemption sends
    info = _wait(job_id, logs, 600)
    log = _rank0_log(logs, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    stopped = int(re.search(r"stopped at step (\d+) on SIGUSR2", log).group(1))
    run = _assert_each_step_once(tmp_path, run_dir, 200)
    assert run.data.tags["resumed_from_step"] == str(stopped) and 20 <= stopped < 200  # the stop's checkpoint
    assert run.data.tags["starts"] == "2" and run.data.tags["slurm.requeues"] == "1"
    assert f"resumed from {run_dir / 'checkpoints'}/{checkpoint.tag_for(stopped)}" in log


def test_a_job_requeued_from_outside_resumes(slurm, tmp_path, toy_world):
    config, logs, run_dir = _preemptible_config(tmp_path, toy_world, 120), tmp_path / "logs", tmp_path / "run"
    job_id = _submit(slurm, config, logs, "--tasks-per-node", "2")
    _wait_for_step(run_dir, 20, job_id, logs)
    subprocess.run(["scontrol", "requeue", job_id], check=True, env=slurm.env)  # SIGTERM, then a new start
    info = _wait(job_id, logs, 600)
    log = _rank0_log(logs, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log[-3000:]
    stopped = int(re.search(r"stopped at step (\d+) on SIGTERM", log).group(1))
    run = _assert_each_step_once(tmp_path, run_dir, 120)
    assert run.data.tags["resumed_from_step"] == str(stopped) and stopped >= 20


def test_a_job_at_its_time_limit_is_requeued_and_finishes(slurm, two_task_job, tmp_path, toy_world):
    # SLURM sends USR2 60 s before the 3-minute limit (its timer runs every 30 s): 70-105 s of
    # training after start-up. 125 s of steps, at the completed job's pace (the median time
    # between its logged steps), outlast the first attempt and fit in the second.
    client, run = _mlflow_run(two_task_job[0], two_task_job[0] / "run")
    stamps = [m.timestamp for m in client.get_metric_history(run.info.run_id, "train/loss")]
    seconds_per_step = statistics.median(b - a for a, b in zip(stamps, stamps[1:])) / 1000
    steps = int(125 / seconds_per_step)
    config, logs, run_dir = _preemptible_config(tmp_path, toy_world, steps), tmp_path / "logs", tmp_path / "run"
    job_id = _submit(slurm, config, logs, "--tasks-per-node", "2", "--time", "3", "--signal-delay", "60",
                     "--max-requeues", "5")
    info = _wait(job_id, logs, 900)
    log = _rank0_log(logs, job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, log[-3000:]
    assert "this job is timed-out" in log  # submitit told the time limit from a preemption
    run = _assert_each_step_once(tmp_path, run_dir, steps)
    assert run.data.tags["slurm.requeues"] == info["Restarts"]


def test_two_nodes_one_task_each(slurm, tmp_path, toy_world):
    if len(slurm.nodes) < 2:
        pytest.skip(f"one host name resolves to this machine ({slurm.nodes}): no second slurmd node")
    config = train_config(tmp_path, toy_world, optim={"steps": 6, "global_batch_size": 16})
    job_id = _submit(slurm, config, tmp_path / "logs", "--nodes", "2", "--tasks-per-node", "1")
    info = _wait(job_id, tmp_path / "logs", 600)
    assert info["JobState"] == "COMPLETED", _rank0_log(tmp_path / "logs", job_id)[-3000:]
    assert info["NumNodes"] == "2"
    run = _assert_each_step_once(tmp_path, tmp_path / "run", 6)
    assert run.data.params["world_size"] == "2" and run.data.tags["slurm.nodelist"] == info["NodeList"]


def test_status_shows_the_one_line_cause_of_a_failed_job(tmp_path, capsys):
    from vilbert import cli as vilbert_cli
    from vilbert.launch.manage import status

    errors = []
    assert vilbert_cli.main(["pretrain", "--config", str(tmp_path / "none.yaml")], errors) == 1
    assert errors == [f"vilbert pretrain: error: --config {tmp_path}/none.yaml: no such file"]
    logs = tmp_path / "logs/77"
    logs.mkdir(parents=True)
    (logs / "77_0_log.err").write_text(f"INFO vilbert.train: ...\n{errors[0]}\nTraceback (most recent call last):\n"
                                       f"  File \"job.py\", line 1\nvilbert.launch.job.JobFailed: {errors[0]}\n")
    capsys.readouterr()
    status("77", str(tmp_path / "logs"))
    assert f"     cause: {errors[0]}" in capsys.readouterr().out


def test_a_sweep_runs_the_pretraining_then_its_dependent_fine_tune_and_the_tables(slurm, tmp_path, toy_world):
    path = write_ablation(tmp_path, toy_world, axes={"data.fraction": [1.0, 0]})
    result = subprocess.run([*LAUNCH, "sweep", str(path), "--log-dir", str(tmp_path / "logs")], cwd=ROOT,
                            env={**ENV, **slurm.env}, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    ids = dict(re.findall(r"submitted (pretrain|finetune fraction=1.0|finetune fraction=0): job\(s\) (\S+)",
                          result.stdout))
    tables_job = re.search(r"submitted the tables: job (\d+)", result.stdout).group(1)
    assert _wait(tables_job, tmp_path / "logs", 900)["JobState"] == "COMPLETED", _rank0_log(tmp_path / "logs",
                                                                                            tables_job)
    pretrain, finetune = job_info(ids["pretrain"]), job_info(ids["finetune fraction=1.0"])
    assert pretrain["JobState"] == finetune["JobState"] == "COMPLETED"
    assert finetune["StartTime"] >= pretrain["EndTime"]  # afterok: the fine-tune waited for its model
    for cell in ("fraction=1.0", "fraction=0"):
        assert (tmp_path / "ablation" / cell / "vqa/model/config.json").exists()
    tables = (tmp_path / "ablation/compare/tables.md").read_text()
    assert "| 1.0 | " in tables and "failed" not in tables and "missing" not in tables
