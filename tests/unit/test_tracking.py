"""MLflow while its server fails: training never waits on it, and what it missed arrives
once it is back, in step order, each step once (during the run, or at the next start)."""

import json
import logging

import pytest

from vilbert.train import tracking
from vilbert.train.config import TrackingConfig


class _Outage:
    """MlflowClient.log_batch fails while `down` (a server that went away)."""

    def __init__(self, monkeypatch):
        import mlflow

        self.down, real = False, mlflow.MlflowClient.log_batch

        def log_batch(client, *args, **kwargs):
            if self.down:
                raise ConnectionError("server unreachable")
            return real(client, *args, **kwargs)
        monkeypatch.setattr(mlflow.MlflowClient, "log_batch", log_batch)


def _tracker(tmp_path, resumed_step=None):
    config = TrackingConfig(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="outage", system_metrics=False,
                            retry_s=0.0)
    tracker = tracking.Tracker(config, tmp_path / "run", enabled=True)
    tracker.start({"p": 1}, "run", resumed_step=resumed_step)
    return tracker


def _log(tracker, steps):
    for step in steps:
        tracker.log_metrics({"train/loss": 10.0 - step}, step)
    tracker.commit()


def _history(tmp_path):
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.read_state(tmp_path / "run")["run_id"]
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    return steps, client.get_run(run_id).data.tags.get("tracking.late_steps")


def test_what_mlflow_missed_while_down_is_sent_when_it_is_back(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, "vilbert")
    outage = _Outage(monkeypatch)
    tracker = _tracker(tmp_path)
    _log(tracker, [1, 2, 3])
    outage.down = True
    _log(tracker, [4, 5, 6])
    _log(tracker, [7, 8])
    assert "MLflow log_batch failed (ConnectionError" in caplog.text
    assert caplog.text.count("MLflow log_batch failed") == 1  # one warning per outage
    outage.down = False
    _log(tracker, [9, 10])
    tracker.finish()
    assert "MLflow is back" in caplog.text
    assert _history(tmp_path) == (list(range(1, 11)), "5")  # 4-8 arrived late, each once
    assert tracking.read_state(tmp_path / "run")["mlflow_step"] == 10


def test_what_mlflow_missed_before_a_stop_is_sent_at_the_next_start(tmp_path, monkeypatch, caplog):
    outage = _Outage(monkeypatch)
    tracker = _tracker(tmp_path)
    _log(tracker, [1, 2])
    outage.down = True
    _log(tracker, [3, 4])
    tracker.log_metrics({"train/loss": 0.5}, 5)  # after the last checkpoint: the resume redoes it
    tracker.finish("KILLED")
    assert "the next start of this run (--resume auto) sends them" in caplog.text
    assert _history(tmp_path) == ([1, 2], None)
    outage.down = False
    resumed = _tracker(tmp_path, resumed_step=4)
    assert _history(tmp_path) == ([1, 2, 3, 4], "2")
    _log(resumed, [5])
    resumed.finish()
    assert _history(tmp_path)[0] == [1, 2, 3, 4, 5]
    assert [json.loads(line)["step"] for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5]


def test_mlflow_down_at_the_start_gets_the_whole_run_once_it_is_up(tmp_path, monkeypatch):
    import mlflow

    real, calls = mlflow.set_experiment, {"n": 0}

    def set_experiment(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ConnectionError("server unreachable")
        return real(*args, **kwargs)
    monkeypatch.setattr(mlflow, "set_experiment", set_experiment)
    tracker = _tracker(tmp_path)
    assert not tracking.read_state(tmp_path / "run")  # no MLflow run yet
    _log(tracker, [1, 2])  # the commit starts the run, then sends the steps (on time: none was refused)
    tracker.finish()
    assert _history(tmp_path) == ([1, 2], None)
    assert pytest.approx(mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(
        tracking.read_state(tmp_path / "run")["run_id"]).data.metrics["train/loss"]) == 8.0


def test_a_metric_name_mlflow_would_refuse_is_an_error_at_once(tmp_path):
    tracker = _tracker(tmp_path)
    with pytest.raises(ValueError, match=r"metric names MLflow refuses: \['val/zero_shot/R@1'\]"):
        tracker.log_metrics({"val/zero_shot/R@1": 0.2, "val/zero_shot/R1": 0.2}, 1)
    _log(tracker, [2])  # every name the project logs is one MLflow takes
    tracker.finish()
    assert _history(tmp_path)[0] == [2]


def test_new_experiments_open_in_the_model_training_view_and_runs_nest_under_a_parent(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = tracking.open_experiment(uri, "kinds")
    assert mlflow.MlflowClient(uri).get_experiment(experiment.experiment_id).tags[tracking.EXPERIMENT_KIND[0]] == \
        "custom_model_development"
    parent = mlflow.MlflowClient(uri).create_run(experiment.experiment_id).info.run_id
    config = TrackingConfig(uri=uri, experiment="kinds", system_metrics=False, parent_run_id=parent,
                            tags={"cell.seed": 3, "ablation.stage": "pretrain"}, params={"cell.seed": 3})
    child = tracking.Tracker(config, tmp_path / "run", enabled=True)
    child.start({"optim.lr": 1e-4, "tracking.tags.cell.seed": 3, "tracking.params.cell.seed": 3}, "cell/pretrain")
    child.finish()
    run = mlflow.MlflowClient(uri).get_run(tracking.read_state(tmp_path / "run")["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["cell.seed"] == "3"
    assert run.data.params == {"optim.lr": "0.0001", "cell.seed": "3"}  # the cell's values once, by their own name
    assert run.info.run_name == "cell/pretrain"
