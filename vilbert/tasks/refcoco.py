"""Referring expressions (RefCOCO+, and RefCOCO / RefCOCOg in the same files) as the paper
fine-tunes them (vilbert_beta `vlbert_tasks.yml`, `refer_expression_dataset.py`).

    input:   [CLS] expression [SEP] (at most 20 tokens) and up to 100 regions + the IMG token;
             in training the image's ground-truth boxes are among the regions (the converter
             writes them into the train split only, as the official code mixes them in there)
    head:    `ViLBERTForTasks.region_head`: one score per region
    target:  per region its IoU with the referred box, 0 where the IoU is below 0.5
    loss:    binary cross-entropy with logits over the regions, averaged, times the number of
             region slots (as the official code); the IMG token is a slot with target 0
    metrics: accuracy: the top-scoring region (the IMG token is no candidate) has IoU >= 0.5
             with the referred box; on val, testA and testB

A shard sample is one image with its expressions in `meta["refs"]` (ref_id, sent_id, the
expression, the referred box in pixels as x1, y1, x2, y2), so the features are stored once per
image; `examples` unpacks them into one example per expression.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vilbert.data.collate import lay_out_regions
from vilbert.data.shard_index import ShardIndex
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer
from vilbert.tasks.base import Task, TaskBatch

HIT_IOU = 0.5  # a region whose IoU with the referred box reaches this is a right answer, and a target


def box_iou(boxes: np.ndarray, box) -> np.ndarray:
    """IoU of each of `boxes` [N, 4] with `box`, pixel boxes x1, y1, x2, y2 counted inclusively
    (a box's width is x2 - x1 + 1), as the official code and the detectors it comes from."""
    boxes, box = np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(box, np.float64)
    width = np.clip(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1, 0, None)
    height = np.clip(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1, 0, None)
    inter = width * height
    area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
    return inter / (area + (box[2] - box[0] + 1) * (box[3] - box[1] + 1) - inter)


def check_ref(ref) -> None:
    """ValueError naming what is wrong with an expression record of a referring-expression shard."""
    if not isinstance(ref, dict):
        raise ValueError(f"an expression is {type(ref).__name__}, not a record")
    if not isinstance(ref.get("sent_id"), int) or isinstance(ref.get("sent_id"), bool):
        raise ValueError(f"sent_id {ref.get('sent_id')!r:.40} is not an integer")
    if not isinstance(ref.get("expression"), str):
        raise ValueError(f"sent_id {ref['sent_id']}: the expression {ref.get('expression')!r:.40} is not a string")
    box = ref.get("box")
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and box[0] <= box[2] and box[1] <= box[3]):
        raise ValueError(f"sent_id {ref['sent_id']}: box {box!r:.60} is not [x1, y1, x2, y2]")


@dataclass
class RefCOCOOptions:
    max_expression_tokens: int = 20  # [CLS] and [SEP] included
    max_regions: int = 100  # regions per image (the IMG token comes on top)


class RefCOCO(Task):
    name = "refcoco"
    options_class = RefCOCOOptions
    train_metric = "accuracy"
    val_metric = "accuracy"
    head = "region_logits"

    def __init__(self, options: RefCOCOOptions, index: ShardIndex, tokenizer_path: str | None = None):
        super().__init__(options, index)
        self.tokenizer = CaptionTokenizer(load_tokenizer(tokenizer_path), max_length=options.max_expression_tokens)

    def examples(self, sample: dict) -> list[dict]:
        """One example per expression, the image's arrays shared, not copied; ValueError (the
        sample is skipped and counted, as any bad sample) for a malformed expression record."""
        refs = sample["meta"]["refs"]
        for ref in refs:
            check_ref(ref)
        n = min(len(sample["boxes"]), self.options.max_regions)
        image = {k: sample[k] for k in ("features", "boxes", "image_w", "image_h")}
        return [{**image, "ref_id": ref.get("ref_id"), "sent_id": ref["sent_id"], "expression": ref["expression"],
                 "ious": box_iou(sample["boxes"][:n], ref["box"])} for ref in refs]  # float64: the 0.5 edge exact

    def collate(self, examples: list[dict]) -> TaskBatch:
        input_ids, attention_mask = self.tokenizer([e["expression"] for e in examples])
        features, locations, region_mask, counts = lay_out_regions(examples, self.options.max_regions)
        ious = torch.zeros(region_mask.shape)  # slot 0 is the IMG token: no region, IoU 0
        for i, (example, n) in enumerate(zip(examples, counts)):
            ious[i, 1:n + 1] = torch.from_numpy(example["ious"][:n])
        inputs = dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                      region_features=features, region_locations=locations, region_mask=region_mask)
        records = [{"ref_id": e["ref_id"], "sent_id": e["sent_id"], "ious": e["ious"].tolist(),
                    "boxes": np.round(e["boxes"][:n], 2).tolist()} for e, n in zip(examples, counts)]
        return TaskBatch(inputs, {"ious": ious}, records, int(attention_mask.sum()))

    def loss_and_metric(self, out, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        logits, ious = out.region_logits.float(), batch.targets["ious"]
        targets = torch.where(ious >= HIT_IOU, ious, torch.zeros_like(ious))
        loss = F.binary_cross_entropy_with_logits(logits, targets) * logits.shape[1]
        chosen = ious.gather(1, self._choose(logits.detach()).unsqueeze(1) + 1)
        return loss, (chosen >= HIT_IOU).float().mean()

    @staticmethod
    def _choose(logits: torch.Tensor) -> torch.Tensor:
        """The top-scoring region's index among the regions (slot 1 on; padding scores -10000)."""
        return logits[:, 1:].argmax(1)

    def predict(self, out, batch: TaskBatch) -> torch.Tensor:
        return self._choose(out.region_logits)

    def evaluate(self, records: list[tuple[dict, int]]) -> dict[str, float]:
        hits = [example["ious"][region] >= HIT_IOU for example, region in records]
        return {"accuracy": sum(hits) / len(hits), "expressions": float(len(hits))} if hits else {}

    def results(self, records: list[tuple[dict, int]]) -> list[dict]:
        return [{"sent_id": example["sent_id"], "ref_id": example["ref_id"], "region": region,
                 "box": example["boxes"][region]} for example, region in records]


TASK = RefCOCO
