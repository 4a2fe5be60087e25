"""The engine: one DeepSpeed loop for pretraining and fine-tuning, with checkpoints and tracking.

What is trained comes from an objective (`pretraining.PretrainingObjective`,
`finetuning.FinetuningObjective`): the model, the batches, the loss and step metrics, and
the evaluation. The loop is the same for both:

    decide how this start relates to the output directory (fresh, resume, overwrite)
    for each optimizer step:
        stop here (checkpoint, exit) if any rank was signalled
        for each micro batch (gradient accumulation):
            batch = next(data); loss, metrics = objective.step(engine, batch); engine.backward(loss); engine.step()
            add the metrics to sums kept on the device (no wait for the device here)
        every log_every steps: read the sums, log metrics (rank 0); evaluate every M steps
        checkpoint every N steps (all ranks) and when the validation metric improved (fine-tuning:
        that checkpoint becomes `best`), then hand the covered metrics to MLflow
    export the model (pretraining: the last checkpoint; fine-tuning: the best)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vilbert.data.tokenizer import check_vocabulary
from vilbert.train import checkpoint, run_dir
from vilbert.train.config import TrainConfig, check_inputs, deepspeed_config
from vilbert.train.distributed import init_distributed, is_collective_failure, slurm_job
from vilbert.train.heartbeat import Heartbeat
from vilbert.train.interrupt import TrainingInterrupted, stop_request
from vilbert.train.optim import build_optimizer, retarget_schedule, warmup_linear_decay
from vilbert.train.precision import float_dtype, resolve_precision
from vilbert.train.step_metrics import StepMetrics
from vilbert.train.threads import set_intra_op_threads
from vilbert.train.tracking import Tracker, git_commit

log = logging.getLogger(__name__)


def _unreported_grad_norm(engine) -> torch.Tensor | float:
    """The gradient norm where DeepSpeed does not report one (ZeRO 0 in fp32), before the
    step clears the gradients (left on the device); NaN where DeepSpeed reports it (ZeRO
    partitions the grads)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if engine.zero_optimization_stage() > 0 or not grads:
        return float("nan")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _data_counts(health) -> dict[str, int]:
    """The training stream's bad and lost samples so far on this rank (summed over ranks when read)."""
    if health is None:  # batches from a data factory (tests)
        return {}
    counts = health.totals()
    return {"data/bad_samples": counts["bad"], "data/lost_samples": counts["lost"]}


def _control_group(device_type: str):
    """A gloo group for the stop flag, so that agreeing on it never waits on a GPU stream."""
    if device_type == "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def _with_epochs(config: TrainConfig, examples: int) -> TrainConfig:
    """Steps and the evaluation interval from `optim.epochs` / `eval.every_epochs`, when set."""
    def steps_for_epochs(epochs: float, examples: int, global_batch_size: int) -> int:
        return max(1, math.ceil(epochs * examples / global_batch_size))

    optim, evaluation = config.optim, config.eval
    if optim.epochs:
        optim = dataclasses.replace(optim, steps=steps_for_epochs(optim.epochs, examples, optim.global_batch_size))
        log.info("%g epochs of %d examples at %d per step: %d steps", config.optim.epochs, examples,
                 optim.global_batch_size, optim.steps)
    if evaluation.every_epochs:
        evaluation = dataclasses.replace(evaluation, every_steps=steps_for_epochs(
            evaluation.every_epochs, examples, optim.global_batch_size))
    return dataclasses.replace(config, optim=optim, eval=evaluation)


def pretrain(config: TrainConfig, resume: str = "none", overwrite: bool = False,
             data_factory=None) -> dict[str, float]:
    """Run (or continue) pretraining; returns the last logged and held-out metrics.
    Raises `RunExists` for an output directory that holds a run (unless `resume` or
    `overwrite`) and `TrainingInterrupted` after a signalled stop and its checkpoint.
    `data_factory(rank, world_size, seed_offset) -> iterator of Batch` replaces the shard
    pipeline (tests use it to feed identical batches to different world sizes)."""
    from vilbert.train.pretraining import PretrainingObjective

    return train(config, lambda env: PretrainingObjective(config, env, data_factory), resume, overwrite)


def finetune(config: TrainConfig, resume: str = "none", overwrite: bool = False) -> dict[str, float]:
    """Fine-tune on `config.task` (as `pretrain` otherwise); the returned metrics include
    the best validation metric (`best/...`) and its step."""
    from vilbert.train.finetuning import FinetuningObjective

    return train(config, lambda env: FinetuningObjective(config, env), resume, overwrite)


def train(config: TrainConfig, make_objective, resume: str, overwrite: bool) -> dict[str, float]:
    with stop_request.installed():  # from the start: a signal during set-up stops before the first step
        check_inputs(config)
        env, device_type = init_distributed(config.distributed.timeout_s)
        with run_dir.owned(config.output_dir, env.is_main, (slurm_job() or {}).get("job_id")):
            return _train(config, make_objective(env), env, device_type, resume, overwrite)


def _train(config: TrainConfig, objective, env, device_type: str, resume: str, overwrite: bool) -> dict[str, float]:
    import deepspeed

    set_intra_op_threads(objective.data_workers)
    if config.optim.epochs or config.eval.every_epochs:
        config = _with_epochs(config, objective.examples_per_epoch)
    start = run_dir.agreed_plan(config, resume, overwrite, env.is_main)  # rank 0 reads, every rank knows, ...
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = objective.build_model()
    check_vocabulary(config.data.tokenizer, model.config.vocab_size)
    ds_config = resolve_precision(deepspeed_config(config, env.world_size), device_type, config.bf16_fallback)
    layout = {"zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
              "precision": str(float_dtype(ds_config)).removeprefix("torch.")}
    changed = run_dir.resume_changes(config, type(model).__name__, model.config.to_dict(), layout) \
        if start.tag is not None else {}
    if env.is_main:
        for key, change in changed.items():
            log.info("resume: %s %s", key, change)
        run_dir.prepare(config, start, overwrite)  # ... rank 0 writes
    checkpoint.barrier()
    optimizer = build_optimizer(model, config.optim, objective.loaded_parameters)
    scheduler = warmup_linear_decay(optimizer, config.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler)
    if env.world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False  # else it flattens, "all-reduces" and copies back every gradient
    # Every rank is here (initialize is collective): from now on a lost rank ends the job.
    heartbeat = Heartbeat(config.output_dir, env.rank, env.world_size, config.distributed.heartbeat_s).start()
    dtype, accumulation = float_dtype(ds_config), engine.gradient_accumulation_steps()
    control = _control_group(device_type)

    checkpoints = config.checkpoint_dir
    if env.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        config.save(Path(config.output_dir) / "config.yaml")
        config.save(checkpoints / "config.yaml")
        model.config.to_json_file(checkpoints / checkpoint.MODEL_CONFIG, use_diff=False)
        (checkpoints / run_dir.LAYOUT_FILE).write_text(json.dumps(layout))
        (checkpoints / checkpoint.MODEL_CLASS).write_text(type(model).__name__)
    state = {"step": 0, "samples": 0, "data_seed": config.data.seed}
    if start.tag is not None:
        state = checkpoint.load(engine, checkpoints, start.tag)
        retarget_schedule(scheduler, config.optim.steps, state["step"])
        log.info("resumed from %s/%s at step %d", checkpoints, start.tag, state["step"])
    best = checkpoint.read_best(checkpoints) if start.tag is not None else None

    tracker = Tracker(config.tracking, config.output_dir, enabled=env.is_main)
    tracker.start({**config.flat(), **{f"deepspeed.{k}": v for k, v in ds_config.items()},
                   "world_size": env.world_size, "launcher": env.launcher, "device": device_type,
                   "git_commit": git_commit(), "resumed_from": start.tag or "",
                   "parameters": sum(p.numel() for p in model.parameters())},
                  run_name=config.tracking.run_name or Path(config.output_dir).name,
                  resumed_step=state["step"] if start.resumed else None,
                  new_run=config.tracking.new_run or start.branched, slurm_job=slurm_job(),
                  tags={f"resume.changed.{key}": change for key, change in changed.items()})
    batches = objective.train_batches(state["step"])
    held_out = objective.held_out()

    def save() -> None:
        checkpoint.save(engine, checkpoints, state, config.checkpoint.keep_last, env.is_main)
        tracker.commit()

    metrics: dict[str, float] = {}
    meter = StepMetrics(engine.device, accumulation, objective.metric_names)
    saved_step = state["step"]
    progress = tqdm(total=config.optim.steps, initial=state["step"], disable=not env.is_main, desc=objective.name,
                    unit="step", dynamic_ncols=True)
    status = "FAILED"
    try:
        while state["step"] < config.optim.steps:
            heartbeat.step = state["step"]
            if stop_request.agreed(control):
                if state["step"] > saved_step:
                    save()
                raise TrainingInterrupted(stop_request.reason, stop_request.signum, state["step"])
            step = state["step"] + 1
            evaluated = held_out is not None and (
                step == config.optim.steps or (config.eval.every_steps and step % config.eval.every_steps == 0))
            logged = evaluated or step % config.tracking.log_every == 0 or step == config.optim.steps
            meter.start_step()
            for _ in range(accumulation):
                fetch = time.perf_counter()
                batch = next(batches)
                meter.count(len(batch), batch.real_tokens, time.perf_counter() - fetch)
                loss, values = objective.step(engine, batch.to(engine.device), dtype)
                engine.backward(loss)
                if logged and engine.is_gradient_accumulation_boundary():
                    own_grad_norm = _unreported_grad_norm(engine)
                engine.step()
                meter.add(values)
            state["step"], state["samples"] = step, state["samples"] + config.optim.global_batch_size
            improved = False
            if logged:  # the only host-device synchronisation of the loop
                metrics = meter.read(env.world_size, _data_counts(objective.data_health))
                grad_norm = engine.get_global_grad_norm()
                metrics.update({"train/lr": engine.get_lr()[0], "train/samples_seen": state["samples"],
                                "train/fresh_lr": engine.get_lr()[-1],  # parameter_groups puts the fresh last
                                "train/grad_norm": float(grad_norm if grad_norm is not None else own_grad_norm)})
                if ds_config.get("fp16", {}).get("enabled"):  # ZeRO and plain fp16 optimizers name it differently
                    scale = getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", None))
                    metrics["train/loss_scale"] = float(scale) if scale is not None else float("nan")
                if evaluated:
                    metrics.update(objective.evaluate(engine, held_out, dtype))
                    value = metrics.get(objective.best_metric) if objective.best_metric else None
                    improved = value is not None and (best is None or value > best["value"])
                    if improved:
                        best = {"tag": checkpoint.tag_for(step), "metric": objective.best_metric, "value": value,
                                "step": step}
                tracker.log_metrics(metrics, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                     samples_s=f"{metrics['train/samples_per_s']:.1f}")
            progress.update(1)
            if improved or step % config.checkpoint.every_steps == 0 or step == config.optim.steps:
                if improved and env.is_main:  # before the save, so that its retention already spares it
                    checkpoint.mark_best(checkpoints, **best)
                save()
                saved_step = step
        heartbeat.stop()  # from here rank 0 works alone (the export) while the others end
        if env.is_main:
            model_dir = Path(config.output_dir) / "model"
            checkpoint.export(checkpoints, model_dir, best["tag"] if best else None)
            tracker.log_artifacts(Path(config.output_dir) / "config.yaml")
            tracker.log_artifacts(model_dir, "model")
        if metrics.get("data/bad_samples") or metrics.get("data/lost_samples"):
            log.warning("data: %d bad samples skipped, %d lost in damaged shards (all ranks; the warnings above name "
                        "them; `python -m shards check` lists every problem)", metrics["data/bad_samples"],
                        metrics["data/lost_samples"])
        elif "data/bad_samples" in metrics:
            log.info("data: no bad or lost samples")
        if best:
            summary = {f"best/{best['metric']}": best["value"], "best/step": best["step"]}
            tracker.log_metrics(summary, state["step"])
            tracker.commit()
            metrics.update(summary)
            log.info("best %s = %.4f at step %d (%s): exported to %s/model", best["metric"], best["value"],
                     best["step"], best["tag"], config.output_dir)
        status = "FINISHED"
    except TrainingInterrupted:
        status = "KILLED"
        raise
    except RuntimeError as e:  # torch.distributed's errors (DistError) are RuntimeErrors too
        if env.world_size > 1 and is_collective_failure(e):
            raise heartbeat.explain(e) from e
        raise
    finally:
        heartbeat.stop()
        progress.close()
        tracker.finish(status)
    metrics["mlflow_run_id"] = tracker.run_id
    return metrics
