"""The engine: one DeepSpeed loop for pretraining and fine-tuning, with checkpoints and tracking.

What is trained comes from an objective (`vilbert.train.objective.Objective`: the model, the
batches, the loss and step metrics, the evaluation); when to evaluate, log and save comes
from the config sections that own it (`eval.due`, `tracking.due`, `checkpoint.due`). The loop
is the same for both objectives:

    set up: plan the start (fresh, resume, overwrite), build the model, DeepSpeed, tracking
    for each optimizer step:
        stop here (checkpoint, exit) if any rank was signalled
        step: for each micro batch, loss = objective.step(batch); backward; DeepSpeed step
              (the step's metrics are summed on the device: no wait for it here)
        log and evaluate when due (the only host-device synchronisation of the loop)
        checkpoint when due, or when the validation metric improved (that one becomes `best`)
    finish: export the model (pretraining: the last checkpoint; fine-tuning: the best)
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vilbert.data.tokenizer import check_vocabulary
from vilbert.model_factory import compile_cache
from vilbert.train import checkpoint, run_dir
from vilbert.train.config import TrainConfig, check_inputs
from vilbert.train.distributed import is_collective_failure, slurm_job
from vilbert.train.heartbeat import Heartbeat
from vilbert.train.host_memory import keep_freed_memory
from vilbert.train.interrupt import TrainingInterrupted, stop_request
from vilbert.train.objective import Objective, best_names
from vilbert.train.optim import build_optimizer, retarget_schedule, warmup_linear_decay
from vilbert.train.runtime import Runtime, start_runtime
from vilbert.train.step_metrics import StepMetrics
from vilbert.train.threads import set_intra_op_threads
from vilbert.train.tracking import Tracker, default_run_name, git_commit

log = logging.getLogger(__name__)


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
    the best validation metric and its step (`objective.best_names`)."""
    from vilbert.train.finetuning import FinetuningObjective

    return train(config, lambda env: FinetuningObjective(config, env), resume, overwrite)


def train(config: TrainConfig, make_objective, resume: str, overwrite: bool) -> dict[str, float]:
    with stop_request.installed():  # from the start: a signal during set-up stops before the first step
        check_inputs(config)
        runtime = start_runtime(config)
        with run_dir.owned(config.output_dir, runtime.env.is_main, (slurm_job() or {}).get("job_id")):
            return Trainer(config, make_objective(runtime.env), runtime).run(resume, overwrite)


def _with_epochs(config: TrainConfig, examples: int) -> TrainConfig:
    """Steps and the evaluation interval from `optim.epochs` / `eval.every_epochs`, when set."""
    def steps_for_epochs(epochs: float) -> int:
        return max(1, math.ceil(epochs * examples / config.optim.global_batch_size))

    optim, evaluation = config.optim, config.eval
    if optim.epochs:
        optim = dataclasses.replace(optim, steps=steps_for_epochs(optim.epochs))
        log.info("%g epochs of %d examples at %d per step: %d steps", optim.epochs, examples,
                 optim.global_batch_size, optim.steps)
    if evaluation.every_epochs:
        evaluation = dataclasses.replace(evaluation, every_steps=steps_for_epochs(evaluation.every_epochs))
    return dataclasses.replace(config, optim=optim, eval=evaluation)


def _unreported_grad_norm(engine) -> torch.Tensor | float:
    """The gradient norm where DeepSpeed does not report one (ZeRO 0 in fp32), before the
    step clears the gradients (left on the device); NaN where DeepSpeed reports it (ZeRO
    partitions the grads)."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if engine.zero_optimization_stage() > 0 or not grads:
        return float("nan")
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def _data_counts(health) -> dict[str, int]:
    """The training stream's bad and lost samples so far on this rank (summed over ranks when read);
    under system/, which MLflow charts apart from the model's metrics."""
    if health is None:  # batches from a data factory (tests)
        return {}
    counts = health.totals()
    return {"system/data_bad_samples": counts["bad"], "system/data_lost_samples": counts["lost"]}


def _control_group(device_type: str):
    """A gloo group for the stop flag, so that agreeing on it never waits on a GPU stream."""
    if device_type == "cpu" or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist.new_group(backend="gloo")


class Trainer:
    """One run of an objective: its phases are the methods below, in the order `run` calls them."""

    def __init__(self, config: TrainConfig, objective: Objective, runtime: Runtime):
        self.objective, self.runtime, self.env = objective, runtime, runtime.env
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()  # the ranks measure the cores' load together, while none of them computes
        set_intra_op_threads(objective.data_workers)
        if runtime.device_type == "cpu":
            keep_freed_memory()
        self.config = _with_epochs(config, objective.examples_per_epoch) \
            if config.optim.epochs or config.eval.every_epochs else config
        self.metrics: dict[str, float] = {}
        self.best: dict | None = None
        self._own_grad_norm = float("nan")

    # -- set-up ---------------------------------------------------------------------------------
    def set_up(self, resume: str, overwrite: bool) -> None:
        """Plan the start, build the model and DeepSpeed, write the run's files, restore a
        checkpoint when resuming, start tracking and the data."""
        import deepspeed

        config, env, objective = self.config, self.env, self.objective
        start = run_dir.agreed_plan(config, resume, overwrite, env.is_main)  # rank 0 reads, every rank knows, ...
        torch.manual_seed(config.seed)  # the same initial weights on every rank
        if config.model.compile and self.runtime.device_type == "cpu" and self.runtime.dtype == torch.bfloat16:
            raise ValueError("model.compile with bf16 on CPU: torch's inductor fails to compile this model in bf16 "
                             "on CPU (a C++ code generation error, torch 2.13); compile in fp32 on CPU, or on a GPU")
        model = objective.build_model(self.runtime.device_type)
        if env.is_main:
            log.info("model.kernels=%s: %s", config.model.kernels, model.kernels.describe())
        check_vocabulary(config.data.tokenizer, model.config.vocab_size)
        changed = run_dir.resume_changes(config, type(model).__name__, model.config.to_dict(), self.runtime.layout) \
            if start.tag is not None else {}
        if env.is_main:
            for key, change in changed.items():
                log.info("resume: %s %s", key, change)
            run_dir.prepare(config, start, overwrite)  # ... rank 0 writes
        checkpoint.barrier()
        optimizer = build_optimizer(model, config.optim, objective.loaded_parameters,
                                    fused_adam="fused_adam" in model.kernels.used)
        scheduler = warmup_linear_decay(optimizer, config.optim)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.runtime.ds_config,
                                                    lr_scheduler=scheduler)
        if env.world_size == 1 and self.engine.zero_optimization_stage() == 0:
            self.engine.enable_backward_allreduce = False  # else it flattens, "all-reduces", copies back every grad
        # Every rank is here (initialize is collective): from now on a lost rank ends the job.
        self.heartbeat = Heartbeat(config.output_dir, env.rank, env.world_size, config.distributed.heartbeat_s).start()
        self.control = _control_group(self.runtime.device_type)
        self.checkpoints = config.checkpoint_dir
        if env.is_main:
            run_dir.write_model_files(config, model, self.runtime.layout)
        self.state = {"step": 0, "samples": 0, "data_seed": config.data.seed}
        if start.tag is not None:
            self.state = checkpoint.load(self.engine, self.checkpoints, start.tag)
            retarget_schedule(scheduler, config.optim.steps, self.state["step"])
            log.info("resumed from %s/%s at step %d", self.checkpoints, start.tag, self.state["step"])
            self.best = checkpoint.read_best(self.checkpoints)
        self.tracker = Tracker(config.tracking, config.output_dir, enabled=env.is_main)
        self.tracker.start({**config.flat(), **{f"deepspeed.{k}": v for k, v in self.runtime.ds_config.items()},
                            "world_size": env.world_size, "launcher": env.launcher,
                            "device": self.runtime.device_type, "git_commit": git_commit(),
                            "resumed_from": start.tag or "", "parameters": sum(p.numel() for p in model.parameters()),
                            "model.kernels_used": ",".join(model.kernels.used) or "none"},
                           run_name=config.tracking.run_name or default_run_name(config.output_dir, config.seed),
                           resumed_step=self.state["step"] if start.resumed else None,
                           new_run=config.tracking.new_run or start.branched, slurm_job=slurm_job(),
                           tags={f"resume.changed.{key}": change for key, change in changed.items()})
        self.batches = objective.train_batches(self.state["step"])
        self.held_out = objective.held_out()
        self.meter = StepMetrics(self.engine.device, self.engine.gradient_accumulation_steps(),
                                 objective.metric_names)
        self.saved_step = self.state["step"]
        self.progress = tqdm(total=config.optim.steps, initial=self.state["step"], disable=not env.is_main,
                             desc=objective.name, unit="step", dynamic_ncols=True)

    # -- one optimizer step -----------------------------------------------------------------------
    def step(self, logged: bool) -> None:
        """Forward, backward and update over the step's micro batches (gradient accumulation)."""
        engine, dtype = self.engine, self.runtime.dtype
        self.meter.start_step()
        for _ in range(engine.gradient_accumulation_steps()):
            fetch = time.perf_counter()
            batch = next(self.batches)
            self.meter.count(len(batch), batch.real_tokens, time.perf_counter() - fetch)
            loss, values = self.objective.step(engine, batch.to(engine.device), dtype)
            engine.backward(loss)
            if logged and engine.is_gradient_accumulation_boundary():
                self._own_grad_norm = _unreported_grad_norm(engine)
            engine.step()
            self.meter.add(values)
        self.state["step"] += 1
        self.state["samples"] += self.config.optim.global_batch_size

    # -- log and evaluate -------------------------------------------------------------------------
    def log_and_evaluate(self, evaluated: bool) -> bool:
        """Read the step's metrics (all ranks), evaluate when due, log (rank 0). Returns
        whether the validation metric improved on the best so far."""
        engine, step = self.engine, self.state["step"]
        metrics = self.meter.read(self.env.world_size, _data_counts(self.objective.data_health))
        grad_norm = engine.get_global_grad_norm()
        metrics.update({"train/lr": engine.get_lr()[0], "train/samples_seen": self.state["samples"],
                        "train/fresh_lr": engine.get_lr()[-1],  # parameter_groups puts the fresh last
                        "train/grad_norm": float(grad_norm if grad_norm is not None else self._own_grad_norm)})
        if self.runtime.ds_config.get("fp16", {}).get("enabled"):  # ZeRO and plain fp16 optimizers name it apart
            scale = getattr(engine.optimizer, "cur_scale", getattr(engine.optimizer, "loss_scale", None))
            metrics["train/loss_scale"] = float(scale) if scale is not None else float("nan")
        improved = False
        if evaluated:
            metrics.update(self.objective.evaluate(engine, self.held_out, self.runtime.dtype))
            name = self.objective.best_metric
            value = metrics.get(name) if name else None
            improved = value is not None and (self.best is None or value > self.best["value"])
            if improved:
                self.best = {"tag": checkpoint.tag_for(step), "metric": name, "value": value, "step": step}
        self.tracker.log_metrics(metrics, step)
        self.progress.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                  samples_s=f"{metrics['train/samples_per_s']:.1f}")
        self.metrics = metrics
        return improved

    # -- checkpoint -------------------------------------------------------------------------------
    def save(self, improved: bool = False) -> None:
        """A checkpoint of every rank's state (collective), then the metrics it covers to MLflow."""
        if improved and self.env.is_main:  # before the save, so that its retention already spares it
            checkpoint.mark_best(self.checkpoints, **self.best)
        checkpoint.save(self.engine, self.checkpoints, self.state, self.config.checkpoint.keep_last, self.env.is_main)
        self.tracker.commit()
        self.saved_step = self.state["step"]

    def stop_if_asked(self) -> None:
        """A signal on any rank: save what is not saved yet, then stop (TrainingInterrupted)."""
        if stop_request.agreed(self.control):
            if self.state["step"] > self.saved_step:
                self.save()
            raise TrainingInterrupted(stop_request.reason, stop_request.signum, self.state["step"])

    # -- finish -----------------------------------------------------------------------------------
    def finish(self) -> dict[str, float]:
        """Export the model (rank 0), report the data's health and the best metric."""
        config, metrics = self.config, self.metrics
        self.heartbeat.stop()  # from here rank 0 works alone (the export) while the others end
        if self.env.is_main:
            model_dir = Path(config.output_dir) / "model"
            checkpoint.export(self.checkpoints, model_dir, self.best["tag"] if self.best else None)
            self.tracker.log_artifacts(Path(config.output_dir) / "config.yaml")
            self.tracker.log_artifacts(model_dir, "model")
        if metrics.get("system/data_bad_samples") or metrics.get("system/data_lost_samples"):
            log.warning("data: %d bad samples skipped, %d lost in damaged shards (all ranks; the warnings above name "
                        "them; `python -m shards check` lists every problem)", metrics["system/data_bad_samples"],
                        metrics["system/data_lost_samples"])
        elif "system/data_bad_samples" in metrics:
            log.info("data: no bad or lost samples")
        if self.best:
            best = self.best
            value_name, step_name = best_names(best["metric"])
            summary = {value_name: best["value"], step_name: best["step"]}
            self.tracker.log_metrics(summary, self.state["step"])
            self.tracker.commit()
            metrics.update(summary)
            log.info("best %s = %.4f at step %d (%s): exported to %s/model", best["metric"], best["value"],
                     best["step"], best["tag"], config.output_dir)
        return metrics

    # -- the whole run ----------------------------------------------------------------------------
    def run(self, resume: str, overwrite: bool) -> dict[str, float]:
        self.set_up(resume, overwrite)
        config, last = self.config, self.config.optim.steps
        status, compiling = "FAILED", config.model.compile  # the first step of a compiled model compiles it
        try:
            while self.state["step"] < last:
                self.heartbeat.step = self.state["step"]
                self.stop_if_asked()
                step = self.state["step"] + 1
                evaluated = self.held_out is not None and config.eval.due(step, last)
                logged = evaluated or config.tracking.due(step, last)
                started = time.perf_counter()
                self.step(logged)
                if compiling and self.env.is_main:
                    log.info("model.compile: the first step took %.1f s (compiling; the compiled kernels are cached "
                             "in %s for the next run)", time.perf_counter() - started, compile_cache())
                compiling = False
                improved = self.log_and_evaluate(evaluated) if logged else False
                self.progress.update(1)
                if improved or config.checkpoint.due(step, last):
                    self.save(improved)
            metrics = self.finish()
            status = "FINISHED"
        except TrainingInterrupted:
            status = "KILLED"
            raise
        except RuntimeError as e:  # torch.distributed's errors (DistError) are RuntimeErrors too
            if self.env.world_size > 1 and is_collective_failure(e):
                raise self.heartbeat.explain(e) from e
            raise
        finally:
            self.heartbeat.stop()
            self.progress.close()
            self.tracker.finish(status)
        metrics["mlflow_run_id"] = self.tracker.run_id
        return metrics
