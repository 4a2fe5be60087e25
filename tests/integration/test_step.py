"""The training step's speed paths: precision chosen from the hardware, metrics that stay on
the device until a logging step, torch threads from the usable cores."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from helpers import ENV, ROOT, synthetic_batch
from vilbert import ViLBERTConfig, ViLBERTForPretraining
from vilbert.train import TrainConfig, precision
from vilbert.train.pretraining import LOSSES, PretrainingObjective
from vilbert.train.step_metrics import StepMetrics
from vilbert.train.threads import set_intra_op_threads, usable_cores

BF16_LOSS_TOLERANCE = 0.02  # relative, per logged step, bf16 against fp32 on the same batches


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("engine") / "out.json"
    subprocess.run([sys.executable, str(ROOT / "tests/support/engine_step.py"), str(out)], check=True, env=ENV,
                   cwd=out.parent, capture_output=True)
    return json.loads(out.read_text())


def test_the_step_reads_nothing_from_the_device_between_logging_steps(engine_run):
    reads = {int(step): sites for step, sites in engine_run["reads"].items()}
    assert engine_run["logged_steps"] == [3, 6]
    assert sorted(reads) == [3, 6], reads  # steps 1, 2, 4, 5 never waited for the device
    assert all(any("read" in site for site in sites) for sites in reads.values())


def test_logged_metrics_equal_reading_every_micro_batch_on_the_host():
    """The device-side sums give exactly (==) the numbers of the former host-side loop."""
    torch.manual_seed(0)
    config = ViLBERTConfig.from_preset("tiny", vocab_size=30522, v_feature_size=12, v_target_size=7)
    model = ViLBERTForPretraining(config).train()
    objective = PretrainingObjective(TrainConfig(), env=None, data_factory=lambda *args: iter(()))
    accumulation, host = 3, dict.fromkeys(objective.metric_names, 0.0)
    meter = StepMetrics("cpu", accumulation, objective.metric_names)
    meter.start_step()
    for i in range(accumulation):
        batch = synthetic_batch(i, 5, 12, 7)
        torch.manual_seed(i)
        _, values = objective.step(model, batch, torch.float32)
        meter.add(values)
        torch.manual_seed(i)  # the same dropout masks for the host-side reference
        out = model(**batch.model_inputs())
        meter.count(len(batch), batch.real_tokens, 0.0)
        for name in LOSSES:
            host[name] += out[name].item() / accumulation
        host["alignment_accuracy"] += (out.alignment_logits.argmax(-1) == batch.alignment_labels
                                       ).float().mean().item() / accumulation
    metrics = meter.read(world_size=1)
    assert {name: metrics[f"train/{name}"] for name in host} == host
    assert metrics["train/tokens_per_s"] > 0 and metrics["train/samples_per_s"] > 0


def test_bf16_through_deepspeed_on_cpu_trains_like_fp32(engine_run):
    """DeepSpeed's bf16 mode (bf16 weights and activations, fp32 master weights) on the CPU
    accelerator, forced on with bf16_fallback=false, against the fp32 run on the same batches."""
    bf16 = engine_run["bf16"]
    assert bf16["dtypes"] == ["torch.bfloat16"]  # the model's weights and inputs
    assert all(n == n and 0 < n < 1e3 for n in bf16["grad_norms"])  # reported, finite
    for step, loss in engine_run["fp32_losses"].items():
        assert abs(bf16["losses"][int(step) - 1] - loss) <= BF16_LOSS_TOLERANCE * loss, (step, bf16["losses"], loss)


def test_bf16_falls_back_to_fp32_where_the_hardware_has_no_bf16(monkeypatch, caplog):
    ds = {"bf16": {"enabled": True}, "gradient_clipping": 1.0}
    caplog.set_level(logging.INFO, logger=precision.__name__)
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: False)
    resolved = precision.resolve_precision(ds, "cpu")
    assert precision.float_dtype(resolved) == torch.float32 and ds["bf16"]["enabled"]  # the input is untouched
    assert "precision: fp32" in caplog.text
    assert precision.float_dtype(precision.resolve_precision(ds, "cpu", fallback=False)) == torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device_type: True)
    caplog.clear()
    assert precision.float_dtype(precision.resolve_precision(ds, "cpu")) == torch.bfloat16
    assert "precision: bfloat16 on cpu" in caplog.text
    assert precision.resolve_precision({"gradient_clipping": 1.0}, "cpu") == {"gradient_clipping": 1.0}


def test_threads_follow_the_usable_cores_minus_the_data_workers(monkeypatch, caplog):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("vilbert.train.threads.busy_cores", lambda cpus: 0.0)  # an idle machine
    assert usable_cores({}) == (16, "affinity 16")
    assert usable_cores({"LOCAL_WORLD_SIZE": "4"})[0] == 4
    assert usable_cores({"LOCAL_SIZE": "2", "CROSS_RANK": "0"})[0] == 8  # the deepspeed launcher's name for it
    assert usable_cores({"SLURM_PROCID": "1", "SLURM_TASKS_PER_NODE": "4(x2)"})[0] == 4  # srun
    assert usable_cores({"SLURM_TASKS_PER_NODE": "4(x2)"})[0] == 16  # the batch shell: not a rank
    assert usable_cores({"OMP_NUM_THREADS": "6", "SLURM_CPUS_PER_TASK": "8"}) == \
        (6, "affinity 16, OMP_NUM_THREADS=6, SLURM_CPUS_PER_TASK=8")
    before = torch.get_num_threads()
    caplog.set_level(logging.INFO)
    try:
        assert set_intra_op_threads(3, {"SLURM_CPUS_PER_TASK": "8"}) == 5 == torch.get_num_threads()
        assert "torch intra-op threads: 5 (8 usable cores" in caplog.text
        assert set_intra_op_threads(4, {"OMP_NUM_THREADS": "2"}) == 1  # never below one
    finally:
        torch.set_num_threads(before)


def test_cores_other_processes_keep_busy_are_not_used(monkeypatch, tmp_path):
    """A thread whose core is taken stalls the whole OpenMP team at every barrier: cores busy
    with other processes when the run starts are left out; lower-priority (nice) work is not."""
    from vilbert.train import threads

    stat = tmp_path / "stat"
    stat.write_text("cpu  9 9 9 9 9 9 9 9 0 0\n"  # the machine's sum: not read
                    "cpu0 100 50 20 300 10 1 2 3 0 0\n"  # user nice system idle iowait irq softirq steal
                    "cpu1 10 0 5 400 0 0 0 0 0 0\ncpu2 1000 0 0 0 0 0 0 0 0 0\n")
    assert threads.cpu_times({0, 1}, str(stat)) == (100 + 20 + 1 + 2 + 3 + 10 + 5, 486 + 415)
    samples = iter([(100, 1000), (160, 1100)])  # 60 of 100 jiffies busy over 2 CPUs: 1.2 cores
    monkeypatch.setattr(threads, "cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    assert threads.busy_cores({0, 1}) == pytest.approx(1.2)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr(threads, "busy_cores", lambda cpus: 5.6)
    assert threads.usable_cores({}) == (10, "affinity 16, 5.6 busy with other processes")
    assert threads.usable_cores({"LOCAL_WORLD_SIZE": "2"})[0] == 5  # the free cores shared by the ranks
    monkeypatch.setattr(threads, "busy_cores", lambda cpus: 16.0)
    assert threads.usable_cores({})[0] == 1  # never below one
