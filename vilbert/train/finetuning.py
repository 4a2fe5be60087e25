"""What fine-tuning trains: `ViLBERTForTasks` on a task's shards (`vilbert.tasks`), starting
from a pretrained model (`model.init`), or, for the paper's no-pretraining baseline, from
BERT in the text stream and fresh weights elsewhere. Task heads always start fresh.

Evaluation predicts every example of a split exactly once across ranks (each rank reads its
own shards), gathers the (example, prediction) records, and scores them with the task's
official metric; the engine keeps the checkpoint with the best validation metric as `best`.
`evaluate_run` does the same for a finished run on any split, and writes the predictions
in the task's evaluation-server format.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vilbert.config_schema import build_section
from vilbert.data.errors import DataError, EmptyStream
from vilbert.train.config import TrainConfig
from vilbert.train.objective import Objective

log = logging.getLogger(__name__)


def make_task(config: TrainConfig, index=None):
    """The configured task (`task.name` + its options in the `task:` section), built on the
    training shard set's index."""
    from vilbert.data.pipeline import shard_index
    from vilbert.tasks import task_class

    options = dict(config.task)
    name = options.pop("name", "")
    if not name:
        raise ValueError("no task: pass --task NAME (or set task.name in the config)")
    cls = task_class(name)
    return cls(build_section(cls.options_class, options, "task."), index or shard_index(config.data),
               config.data.tokenizer)


def build_task_model(config: TrainConfig, task, feature_dim: int, device_type: str = "cpu"):
    """The model to fine-tune and the state-dict names loaded into it (model.init's encoder, or
    model.bert's text stream); the rest starts fresh."""
    from vilbert.model_factory import build_model
    from vilbert.modeling.registry import TASKS

    model, loaded = build_model(config.model, TASKS, {"v_feature_size": feature_dim}, task.model_overrides(),
                                device_type=device_type)
    if not config.model.init and config.model.bert:
        log.info("no pretraining: text stream from BERT (%d tensors), the rest fresh", len(loaded))
    return model, loaded


def _lockstep(batches, device):
    """ZeRO-3 forwards are collective, so every rank runs as many as the rank with the most
    batches: a rank that has run out repeats its last batch, flagged as a repeat."""
    iterator, last = iter(batches), None
    while True:
        batch = next(iterator, None)
        more = torch.tensor([batch is not None], dtype=torch.int32, device=device)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if not more.item():
            return
        if batch is None and last is None:
            raise DataError("a rank has no evaluation batch at all: give the split at least as many shards as ranks")
        last = batch if batch is not None else last
        yield last, batch is not None


@torch.no_grad()
def predict(model, batches, task, dtype: torch.dtype, device, collective_forward: bool = False,
            show_progress: bool = False, source: str = "the split") -> list[tuple[dict, int]]:
    """(example, prediction) records of every rank (the same list on each), each example
    once. Predictions stay on the device until the last batch. No example at all (from
    `source`, the shards) is EmptyStream."""
    model.eval()
    distributed = dist.is_initialized() and dist.get_world_size() > 1
    steps = _lockstep(batches, device) if collective_forward and distributed else ((b, True) for b in batches)
    predictions, examples = [], []
    for batch, real in tqdm(steps, desc=f"evaluating {task.name}", unit="batch", disable=not show_progress,
                            leave=False):
        out = model(**batch.to(device).model_inputs(dtype))
        if real:
            predictions.append(task.predict(out, batch))
            examples += batch.examples
    model.train()
    records = list(zip(examples, torch.cat(predictions).tolist() if predictions else []))
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, records)
        records = [record for part in gathered for record in part]
    if not records:
        raise EmptyStream(f"{source} gave no example to evaluate on any rank; run `python -m shards check {source}`")
    return records


class FinetuningObjective(Objective):
    data_health = None  # the training stream's sample counts (vilbert.data.pipeline.DataHealth)

    def __init__(self, config: TrainConfig, env):
        from vilbert.data.pipeline import shard_index

        self.config, self.env = config, env
        self.index = shard_index(config.data)
        self.task = make_task(config, self.index)
        self.name = f"fine-tuning {self.task.name}"
        self.metric_names = ("loss", self.task.train_metric)
        self.best_metric = f"val/{self.task.val_metric}"
        if config.eval.shards:
            self.task.check_split(shard_index(dataclasses.replace(config.data, shards=config.eval.shards)),
                                  config.eval.shards)

    @property
    def examples_per_epoch(self) -> int:
        return self.index.task.get("examples") or self.index.num_samples

    @property
    def data_workers(self) -> int:
        return self.config.data.workers

    def build_model(self, device_type: str):
        model, self.loaded_parameters = build_task_model(self.config, self.task, self.index.feature_dim, device_type)
        return model

    def _loader(self, data_config, train: bool, seed_offset: int = 0):
        from vilbert.data import build_loader

        loader, _ = build_loader(data_config, train=train, rank=self.env.rank, world_size=self.env.world_size,
                                 seed_offset=seed_offset, task=self.task)
        return loader

    def train_batches(self, seed_offset: int):
        loader = self._loader(self.config.data, True, seed_offset)
        self.data_health = loader.health
        return iter(loader)

    def held_out(self):
        """The validation split's loader: each evaluation is a fresh pass over all of it."""
        if not self.config.eval.shards:
            return None
        return self._loader(dataclasses.replace(self.config.data, shards=self.config.eval.shards), False)

    def step(self, engine, batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        out = engine(**batch.model_inputs(dtype))
        loss, metric = self.task.loss_and_metric(out, batch)
        return loss, torch.stack([loss.detach().float(), metric.float()])

    def evaluate(self, engine, loader, dtype: torch.dtype) -> dict[str, float]:
        records = predict(engine, loader, self.task, dtype, engine.device,
                          collective_forward=engine.zero_optimization_stage() == 3, show_progress=self.env.is_main,
                          source=self.config.eval.shards)
        metrics = {f"val/{name}": value for name, value in self.task.evaluate(records).items()}
        if not metrics and self.env.is_main:
            log.warning("eval.shards=%s holds no answers (a test split?): no validation metric, so no checkpoint is "
                        "called best and the last step's model is exported", self.config.eval.shards)
        return metrics


def evaluate_run(run_dir: str | Path, split: str, out: str | Path | None = None, tag: str | None = None,
                 overrides: list[str] = ()) -> dict[str, float]:
    """Evaluate a fine-tuning run's best model (or checkpoint `tag`) on `split`: `val` (the
    run's validation shards), `train`, or a shard set. Returns the metrics (empty for a
    split without labels); writes the predictions in the server's format to `out` (default
    `<run_dir>/results-<split name>.json`) and logs the metrics to the run's MLflow run."""
    from vilbert.config import ViLBERTConfig
    from vilbert.modeling.registry import TASKS, model_class
    from vilbert.train import checkpoint
    from vilbert.train.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise FileNotFoundError(f"{run_dir} is not a fine-tuning output directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml", overrides)
    shards = {"val": config.eval.shards, "train": config.data.shards}.get(split, split)
    cls = model_class(config.model.arch, TASKS)
    if tag is None:
        model = cls.from_pretrained(run_dir / "model")
    else:
        model = cls(ViLBERTConfig.from_json_file(config.checkpoint_dir / checkpoint.MODEL_CONFIG))
        model.load_state_dict(checkpoint.fp32_state_dict(config.checkpoint_dir, tag))
    best = checkpoint.read_best(config.checkpoint_dir)
    step = checkpoint.tag_step(tag) if tag else best["step"] if best else 0  # the evaluated model's step
    out = Path(out or run_dir / f"results-{_split_name(split)}.json")
    return _evaluate_split(config, make_task(config), model, shards, out, run_dir, "val" if split == "val" else "test",
                           step)


def evaluate_zero_shot(model_dir: str | Path, split: str, task_name: str, out: str | Path | None = None,
                       overrides: list[str] = ()) -> dict[str, float]:
    """Evaluate a pretrained model (a `save_pretrained` directory of pretraining), not
    fine-tuned, on the shard set `split` with a task that can score with the pretraining
    heads (retrieval: the alignment head). Writes the results to `out` (default
    `<model_dir>/zero-shot-<task>-<split name>.json`); where the model is a pretraining run's
    export (`<run>/model`), the metrics go to that run's metrics.jsonl and MLflow run too
    (as `zero_shot/<task>/...`)."""
    from vilbert.config import ViLBERTConfig
    from vilbert.modeling.registry import ARCHITECTURES, PRETRAINING, class_named
    from vilbert.train.config import load_config

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a pretrained model directory (no config.json): give the "
                                "`model` directory of a pretraining run, or convert-official output")
    cls = class_named((ViLBERTConfig.from_json_file(model_dir / "config.json").architectures or ["?"])[0])
    if cls not in {classes[PRETRAINING] for classes in ARCHITECTURES.values()}:
        raise ValueError(f"{model_dir} holds a {cls.__name__}: zero-shot evaluation needs a pretrained model "
                         "(with its alignment head), not a fine-tuned one")
    run_dir = model_dir.parent if (model_dir.parent / "config.yaml").is_file() else None
    config = load_config(None, [*overrides, f"task.name={task_name}", "task.zero_shot=true", f"data.shards={split}"])
    if run_dir is not None:  # the pretraining run's tracking (its MLflow store and run), as overridden
        config.tracking = load_config(run_dir / "config.yaml",
                                      [o for o in overrides if o.startswith("tracking.")]).tracking
    task = make_task(config)  # built on the split itself: there is no training set
    return _evaluate_split(config, task, cls.from_pretrained(model_dir), split,
                           Path(out or model_dir / f"zero-shot-{task_name}-{_split_name(split)}.json"), run_dir,
                           f"zero_shot/{task_name}", None)


def _split_name(split: str) -> str:
    return split if split in ("val", "train") else Path(split.rstrip("/")).name


def _evaluate_split(config: TrainConfig, task, model, shards: str, out: Path, run_dir: Path | None, prefix: str,
                    step: int | None) -> dict[str, float]:
    """Predict every example of `shards` with `model` (all ranks), score with `task`, write the
    results to `out` and, with a `run_dir`, add the metrics (`<prefix>/<name>`) to that run's
    records."""
    from vilbert.data import build_loader
    from vilbert.data.pipeline import shard_index
    from vilbert.train.runtime import start_runtime
    from vilbert.train.tracking import log_evaluation, read_metrics

    runtime = start_runtime(config, training=False)
    env, device, dtype = runtime.env, runtime.device, runtime.dtype
    data = dataclasses.replace(config.data, shards=shards, fraction=1.0)
    task.check_split(shard_index(data), shards)
    model.to(device=device, dtype=dtype)
    loader, _ = build_loader(data, train=False, rank=env.rank, world_size=env.world_size, task=task)
    records = predict(model, loader, task, dtype, device, show_progress=env.is_main, source=shards)
    metrics = task.evaluate(records)
    if env.is_main:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(task.results(records)))
        if run_dir is not None:
            if step is None:  # a pretraining run: its last step
                step = max((m["step"] for m in read_metrics(run_dir)), default=0)
            log_evaluation(run_dir, config.tracking, {f"{prefix}/{k}": v for k, v in metrics.items()}, step,
                           tags={f"{prefix}.split": shards, f"{prefix}.results": str(out),
                                 **({f"{prefix}.metric_version": task.metric_version} if task.metric_version else {})})
        log.info("%d predictions on %s -> %s%s", len(records), shards, out,
                 f" (metric: {task.metric_version})" if task.metric_version else "")
    return metrics
