"""Pretraining: DeepSpeed engine, the loop, checkpoints and tracking.

    decide how this start relates to the output directory (fresh, resume, overwrite)
    for each optimizer step:
        stop here (checkpoint, exit) if any rank was signalled
        for each micro batch (gradient accumulation):
            batch = next(data); out = model(batch); engine.backward(out.loss); engine.step()
            add the losses to sums kept on the device (no wait for the device here)
        every log_every steps: read the sums, log metrics (rank 0); evaluate every M steps
        checkpoint every N steps (all ranks), then hand the covered metrics to MLflow
"""

from __future__ import annotations

import dataclasses
import logging
import time
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vilbert.train import checkpoint, run_dir
from vilbert.train.config import TrainConfig, deepspeed_config
from vilbert.train.distributed import init_distributed, slurm_job
from vilbert.train.evaluate import evaluate
from vilbert.train.interrupt import TrainingInterrupted, stop_request
from vilbert.train.optim import build_optimizer, retarget_schedule, warmup_linear_decay
from vilbert.train.precision import float_dtype, resolve_precision
from vilbert.train.step_metrics import StepMetrics
from vilbert.train.threads import set_intra_op_threads
from vilbert.train.tracking import Tracker, git_commit

log = logging.getLogger(__name__)
EVAL_SEED_OFFSET = -1  # the held-out batches' stream seed, apart from every training step's


def build_model(config: TrainConfig, feature_dim: int, num_classes: int):
    from vilbert import SingleStreamForPretraining, ViLBERTConfig, ViLBERTForPretraining
    from vilbert.data.tokenizer import default_vocab

    vil_config = ViLBERTConfig.from_preset(config.model.preset, **{
        "v_feature_size": feature_dim, "v_target_size": num_classes, **config.model.overrides})
    model_class = SingleStreamForPretraining if config.model.single_stream else ViLBERTForPretraining
    if not config.model.bert:
        return model_class(vil_config)
    bert = default_vocab() if config.model.bert == "minilm" else config.model.bert
    model, report = model_class.from_bert(bert, vil_config)
    log.info("text stream from %s: %d tensors loaded, %d start fresh", bert, len(report.loaded), len(report.missing))
    return model


def _unreported_grad_norm(engine) -> torch.Tensor | float:
    """The gradient norm where DeepSpeed does not report one (ZeRO 0 in fp32), before the
    step clears the gradients (left on the device); NaN where DeepSpeed reports it (ZeRO
    partitions the grads)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if engine.zero_optimization_stage() > 0 or not grads:
        return float("nan")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _data(data_config, env, seed_offset: int, visual_target: int, data_factory):
    if data_factory is not None:
        return data_factory(env.rank, env.world_size, seed_offset)
    from vilbert.data import build_loader

    loader, _ = build_loader(data_config, train=True, rank=env.rank, world_size=env.world_size,
                             seed_offset=seed_offset, visual_target=visual_target)
    return iter(loader)


def _control_group(device_type: str):
    """A gloo group for the stop flag, so that agreeing on it never waits on a GPU stream."""
    if device_type == "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


def pretrain(config: TrainConfig, resume: str = "none", overwrite: bool = False,
             data_factory=None) -> dict[str, float]:
    """Run (or continue) pretraining; returns the last logged and held-out metrics.
    Raises `RunExists` for an output directory that holds a run (unless `resume` or
    `overwrite`) and `TrainingInterrupted` after a signalled stop and its checkpoint.
    `data_factory(rank, world_size, seed_offset) -> iterator of Batch` replaces the shard
    pipeline (tests use it to feed identical batches to different world sizes)."""
    with stop_request.installed():  # from the start: a signal during set-up stops before the first step
        return _pretrain(config, resume, overwrite, data_factory)


def _pretrain(config: TrainConfig, resume: str, overwrite: bool, data_factory) -> dict[str, float]:
    env, device_type = init_distributed()
    set_intra_op_threads(config.data.workers if data_factory is None else 0)
    import deepspeed

    from vilbert.data.pipeline import shard_index

    start = run_dir.plan(config, resume, overwrite)  # every rank reads, ...
    if env.is_main:
        run_dir.prepare(config, start, overwrite)  # ... rank 0 writes
    checkpoint.barrier()
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    index = shard_index(config.data) if data_factory is None else None
    model = build_model(config, *(index.feature_dim, index.num_classes) if index else
                        (config.model.overrides["v_feature_size"], config.model.overrides["v_target_size"]))
    ds_config = resolve_precision(deepspeed_config(config, env.world_size), device_type, config.bf16_fallback)
    optimizer = build_optimizer(model, config.optim)
    scheduler = warmup_linear_decay(optimizer, config.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler)
    if env.world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False  # else it flattens, "all-reduces" and copies back every gradient
    dtype, accumulation = float_dtype(ds_config), engine.gradient_accumulation_steps()
    control = _control_group(device_type)

    checkpoints = config.checkpoint_dir
    if env.is_main:
        checkpoints.mkdir(parents=True, exist_ok=True)
        config.save(Path(config.output_dir) / "config.yaml")
        config.save(checkpoints / "config.yaml")
        model.config.to_json_file(checkpoints / checkpoint.MODEL_CONFIG)
        (checkpoints / checkpoint.MODEL_CLASS).write_text(type(model).__name__)
    state = {"step": 0, "samples": 0, "data_seed": config.data.seed}
    if start.tag is not None:
        state = checkpoint.load(engine, checkpoints, start.tag)
        retarget_schedule(scheduler, config.optim.steps, state["step"])
        log.info("resumed from %s/%s at step %d", checkpoints, start.tag, state["step"])

    tracker = Tracker(config.tracking, config.output_dir, enabled=env.is_main)
    tracker.start({**config.flat(), **{f"deepspeed.{k}": v for k, v in ds_config.items()},
                   "world_size": env.world_size, "launcher": env.launcher, "device": device_type,
                   "git_commit": git_commit(), "resumed_from": start.tag or "",
                   "parameters": sum(p.numel() for p in model.parameters())},
                  run_name=config.tracking.run_name or Path(config.output_dir).name,
                  resumed_step=state["step"] if start.resumed else None,
                  new_run=config.tracking.new_run or start.branched, slurm_job=slurm_job())
    batches = _data(config.data, env, state["step"], model.config.visual_target, data_factory)
    held_out = None
    if config.eval.shards:
        eval_data = dataclasses.replace(config.data, shards=config.eval.shards, fraction=1.0)
        # Drawn once and kept (compact, on the host): every evaluation sees the same batches.
        held_out = list(islice(_data(eval_data, env, EVAL_SEED_OFFSET, model.config.visual_target, None),
                               config.eval.max_batches))

    def save() -> None:
        checkpoint.save(engine, checkpoints, state, config.checkpoint.keep_last, env.is_main)
        tracker.commit()

    metrics: dict[str, float] = {}
    meter = StepMetrics(engine.device, accumulation)
    saved_step = state["step"]
    progress = tqdm(total=config.optim.steps, initial=state["step"], disable=not env.is_main, desc="pretraining",
                    unit="step", dynamic_ncols=True)
    status = "FAILED"
    try:
        while state["step"] < config.optim.steps:
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
                batch = batch.to(engine.device)
                out = engine(**batch.model_inputs(dtype))
                engine.backward(out.loss)
                if logged and engine.is_gradient_accumulation_boundary():
                    own_grad_norm = _unreported_grad_norm(engine)
                engine.step()
                meter.add(out, batch.alignment_labels)
            state["step"], state["samples"] = step, state["samples"] + config.optim.global_batch_size
            if logged:  # the only host-device synchronisation of the loop
                metrics = meter.read(env.world_size)
                grad_norm = engine.get_global_grad_norm()
                metrics.update({"train/lr": engine.get_lr()[0], "train/samples_seen": state["samples"],
                                "train/grad_norm": float(grad_norm if grad_norm is not None else own_grad_norm)})
                if ds_config.get("fp16", {}).get("enabled"):  # ZeRO and plain fp16 optimizers name it differently
                    scale = getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", None))
                    metrics["train/loss_scale"] = float(scale) if scale is not None else float("nan")
                if evaluated:
                    metrics.update(evaluate(engine, held_out, dtype))
                tracker.log_metrics(metrics, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                     samples_s=f"{metrics['train/samples_per_s']:.1f}")
            progress.update(1)
            if step % config.checkpoint.every_steps == 0 or step == config.optim.steps:
                save()
                saved_step = step
        if env.is_main:
            model_dir = Path(config.output_dir) / "model"
            checkpoint.export(checkpoints, model_dir)
            tracker.log_artifacts(Path(config.output_dir) / "config.yaml")
            tracker.log_artifacts(model_dir, "model")
        status = "FINISHED"
    except TrainingInterrupted:
        status = "KILLED"
        raise
    finally:
        progress.close()
        tracker.finish(status)
    metrics["mlflow_run_id"] = tracker.run_id
    return metrics
