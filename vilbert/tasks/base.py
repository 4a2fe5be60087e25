"""What a fine-tuning task is, as the engine sees it.

A task turns one shard sample (an image and its task annotations in `meta`) into examples,
examples into a `TaskBatch`, and the outputs of `ViLBERTForTasks` into a loss, a training
metric, predictions, and evaluation metrics. The engine (`vilbert.train.loop`) does the rest:
DeepSpeed, checkpoints, the best checkpoint, tracking, launchers.

Evaluation is split between the device and the host: `predict` gives one tensor of
predictions per batch (kept on the device, read once at the end), and `evaluate` scores
the gathered (example, prediction) records of every rank on the host, where the official
metrics (string normalisation, leave-one-out averages) are simplest to get exactly right.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vilbert.data.shard_index import ShardIndex

FLOAT_INPUTS = ("region_features", "region_locations")  # cast to the run's float type
REGION_INPUTS = (*FLOAT_INPUTS, "region_mask")  # one row per image; spread over the text rows on the device


@dataclass
class TaskBatch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of `ViLBERTForTasks.forward`
    targets: dict[str, torch.Tensor]  # what the loss and the training metric compare with
    examples: list[dict] = field(default_factory=list)  # host records: ids and labels for evaluation
    real_tokens: int = 0  # unpadded text tokens (the engine's tokens/s)
    region_rows: torch.Tensor | None = None  # [text rows]: the image row each text row meets (None: row i, row i)

    def to(self, device) -> TaskBatch:
        def move(tensors):
            return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}

        rows = None if self.region_rows is None else self.region_rows.to(device, non_blocking=True)
        return TaskBatch(move(self.inputs), move(self.targets), self.examples, self.real_tokens, rows)

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The model's keyword arguments. With `region_rows` the region inputs hold each image
        once and the text inputs one row per (text, image) pair to score: the images cross to
        the device once and are spread over the text rows there (a multiple-choice example's
        sequences share its image; a retrieval caption meets several images)."""
        inputs = {k: v.to(dtype) if k in FLOAT_INPUTS else v for k, v in self.inputs.items()}
        if self.region_rows is not None:
            inputs.update({k: inputs[k].index_select(0, self.region_rows) for k in REGION_INPUTS if k in inputs})
        return inputs

    def __len__(self) -> int:
        return len(self.examples)


class Task:
    """One task. Subclasses set the class attributes and implement the methods; their
    module defines `TASK = TheirClass`, which is what makes `vilbert finetune --task NAME`
    find them."""

    name: str  # the registry name: the module's name
    options_class: type  # dataclass of the task's keys in the config's `task:` section
    train_metric: str  # the training metric beside the loss, e.g. "score"
    val_metric: str  # the evaluation metric that picks the best checkpoint (higher is better)
    head: str  # the `ViLBERTTaskOutput` field the task reads, e.g. "vqa_logits"

    def __init__(self, options, index: ShardIndex, tokenizer_path: str | None = None):
        self.options, self.index = options, index

    @property
    def metric_version(self) -> str:
        """Which version of an official metric `evaluate` follows, where it has several ("" if not)."""
        return ""

    def model_overrides(self) -> dict:
        """`ViLBERTConfig` fields the task's head needs (e.g. the answer count)."""
        return {}

    def check_split(self, index: ShardIndex, where: str) -> None:
        """Raise if a shard set (validation, test) does not fit the task built from the training set."""

    def unpacker(self, shards: str, train: bool) -> Callable[[dict], list[dict]]:
        """What turns a sample of the shard set `shards` into examples, for training or for
        evaluation: `examples`, unless the task's examples need more than their own sample
        (retrieval: other images of the set). Called once per data stream, before its workers start."""
        return self.examples

    def examples(self, sample: dict) -> list[dict]:
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> TaskBatch:
        raise NotImplementedError

    def loss_and_metric(self, out, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to train (with its graph) and the training metric (detached), on the device."""
        raise NotImplementedError

    def predict(self, out, batch: TaskBatch) -> torch.Tensor:
        """[B] predictions on the device (e.g. the argmax answer's index), or [B, k] (e.g. the
        scores of a multiple-choice example's k choices)."""
        raise NotImplementedError

    def evaluate(self, records: list[tuple[dict, int]]) -> dict[str, float]:
        """Metrics (names without the split prefix) over (example, prediction) records of
        every rank; an empty dict for a split without labels."""
        raise NotImplementedError

    def results(self, records: list[tuple[dict, int]]) -> list[dict]:
        """The predictions in the format the task's evaluation server takes."""
        raise NotImplementedError
