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

from dataclasses import dataclass, field

import torch

from vilbert.data.shard_index import ShardIndex

FLOAT_INPUTS = ("region_features", "region_locations")  # cast to the run's float type
REGION_INPUTS = (*FLOAT_INPUTS, "region_mask")  # one row per image; repeated per choice on the device


@dataclass
class TaskBatch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of `ViLBERTForTasks.forward`
    targets: dict[str, torch.Tensor]  # what the loss and the training metric compare with
    examples: list[dict] = field(default_factory=list)  # host records: ids and labels for evaluation
    real_tokens: int = 0  # unpadded text tokens (the engine's tokens/s)
    choices: int = 1  # text rows per image row: a multiple-choice example's sequences share its image

    def to(self, device) -> TaskBatch:
        def move(tensors):
            return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}

        return TaskBatch(move(self.inputs), move(self.targets), self.examples, self.real_tokens, self.choices)

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The model's keyword arguments. With `choices` > 1 the region inputs hold one row per
        example and the text inputs `choices` rows per example: the regions cross to the device
        once and are repeated there, row i of the text meeting image row i // choices."""
        inputs = {k: v.to(dtype) if k in FLOAT_INPUTS else v for k, v in self.inputs.items()}
        if self.choices > 1:
            inputs.update({k: inputs[k].repeat_interleave(self.choices, 0) for k in REGION_INPUTS if k in inputs})
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
