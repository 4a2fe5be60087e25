"""Decoded samples -> the batch the model takes: tokenise, lay out regions (IMG token
first), mask both streams, and build the masked-region targets.

A batch stays compact until it reaches the device: features in float16 and the detector's
class distributions as top-k (index, probability). `Batch.model_inputs()` casts the
features and expands the distributions into the dense targets of the KL objective there,
so workers, shared memory and host-to-device copies move ~20x fewer target bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from vilbert.config import VISUAL_TARGET_KL
from vilbert.data.masking import mask_regions, mask_tokens
from vilbert.data.tokenizer import CaptionTokenizer
from vilbert.losses import labelled_positions

IMG_LOCATION = (0.0, 0.0, 1.0, 1.0, 1.0)  # the IMG token covers the whole image


def expand_class_distribution(index: torch.Tensor, prob: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Top-k [..., k] -> dense [..., C] distributions: the mass outside the top-k is spread
    evenly over the other classes so that every row sums to 1. The shard writer stores the
    top-k; docs/data.md "Shard format" measures what this costs the KL target."""
    prob = prob.float()
    rest = (1.0 - prob.sum(-1, keepdim=True)).clamp(min=0) / max(num_classes - index.shape[-1], 1)
    dense = rest.expand(*index.shape[:-1], num_classes).contiguous()
    return dense.scatter_(-1, index.long(), prob)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] with masked tokens replaced
    token_type_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] 1 = real token
    region_features: torch.Tensor  # [B, R, F] float16, IMG token first, masked regions zeroed
    region_locations: torch.Tensor  # [B, R, 5]
    region_mask: torch.Tensor  # [B, R] 1 = real region (IMG included)
    masked_lm_labels: torch.Tensor  # [B, T] original ids of masked tokens, IGNORE_INDEX elsewhere
    masked_lm_positions: torch.Tensor  # [N] flat indices of the labelled tokens (the model gathers there)
    masked_regions: torch.Tensor  # [B, R] bool
    alignment_labels: torch.Tensor  # [B] 0 = the caption is the image's, 1 = another image's
    num_classes: int = 0
    class_index: torch.Tensor | None = None  # [B, R, k] top-k detector classes (KL objective)
    class_prob: torch.Tensor | None = None  # [B, R, k] their probabilities
    feature_targets: torch.Tensor | None = None  # [B, R, F] unmasked features (regression / NCE)
    keys: list[str] = field(default_factory=list)
    real_tokens: int = 0  # unpadded text tokens, counted on the host (the engine's tokens/s)

    def to(self, device) -> Batch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return Batch(**{name: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                        for name, v in values.items()})

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Keyword arguments of `ViLBERTForPretraining.forward`, floats in `dtype`."""
        if self.class_index is not None:
            targets = expand_class_distribution(self.class_index, self.class_prob, self.num_classes).to(dtype)
        else:
            targets = self.feature_targets.to(dtype)
        return dict(input_ids=self.input_ids, token_type_ids=self.token_type_ids, attention_mask=self.attention_mask,
                    region_features=self.region_features.to(dtype), region_locations=self.region_locations.to(dtype),
                    region_mask=self.region_mask, masked_lm_labels=self.masked_lm_labels,
                    masked_regions=self.masked_regions, region_targets=targets, alignment_labels=self.alignment_labels,
                    masked_lm_positions=self.masked_lm_positions)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def region_locations(boxes: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
    """Pixel boxes [N, 4] -> [x1/W, y1/H, x2/W, y2/H, box area / image area]."""
    scaled = boxes / np.array([image_w, image_h, image_w, image_h], np.float32)
    area = (scaled[:, 2] - scaled[:, 0]) * (scaled[:, 3] - scaled[:, 1])
    return np.concatenate([scaled, area[:, None]], 1)


def lay_out_regions(samples: list[dict], max_regions: int):
    """The region stream of a batch: IMG token (mean of the regions, whole-image location)
    first, then up to `max_regions` regions per image, padded to the batch's largest count
    + 1. Returns features [B, R, F] float16, locations [B, R, 5], region_mask [B, R] and the
    region counts."""
    counts = [min(len(s["features"]), max_regions) for s in samples]
    batch, slots = len(samples), max(counts) + 1
    features = torch.zeros(batch, slots, samples[0]["features"].shape[1], dtype=torch.float16)
    locations = torch.zeros(batch, slots, 5)
    for i, (s, n) in enumerate(zip(samples, counts)):
        regions = torch.from_numpy(s["features"][:n])
        features[i, 1:n + 1] = regions
        features[i, 0] = regions.sum(0, dtype=torch.float32) / n  # IMG token: mean of the regions, before masking
        locations[i, 1:n + 1] = torch.from_numpy(region_locations(s["boxes"][:n], s["image_w"], s["image_h"]))
    locations[:, 0] = torch.tensor(IMG_LOCATION)
    region_mask = (torch.arange(slots) < torch.tensor(counts)[:, None] + 1).long()
    return features, locations, region_mask, counts


class Collator:
    """Builds `Batch`es from samples that carry `caption` and `alignment_label` (chosen
    upstream) next to the decoded arrays. Regions (at most `max_regions` per image) are
    padded to the batch's largest count + 1 (the IMG token); text as `CaptionTokenizer` does."""

    def __init__(self, tokenizer: CaptionTokenizer, *, max_regions: int, num_classes: int, class_topk: int,
                 visual_target: int = VISUAL_TARGET_KL, seed: int = 0):
        self.tokenizer = tokenizer
        self.max_regions, self.num_classes, self.class_topk = max_regions, num_classes, class_topk
        self.visual_target = visual_target
        self.special_ids = torch.tensor(tokenizer.special_ids)
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def __call__(self, samples: list[dict]) -> Batch:
        token_ids, attention_mask = self.tokenizer([s["caption"] for s in samples])
        maskable = attention_mask.bool() & ~torch.isin(token_ids, self.special_ids)
        input_ids, mlm_labels = mask_tokens(token_ids, maskable, self.tokenizer.mask_token_id,
                                            self.tokenizer.vocab_size, self.generator)

        kl = self.visual_target == VISUAL_TARGET_KL
        features, locations, region_mask, counts = lay_out_regions(samples, self.max_regions)
        batch, slots, k = features.shape[0], features.shape[1], self.class_topk
        class_index, class_prob = None, None
        if kl:
            class_index = torch.zeros(batch, slots, k, dtype=torch.int16)
            class_prob = torch.zeros(batch, slots, k, dtype=torch.float16)
            for i, (s, n) in enumerate(zip(samples, counts)):
                class_prob[i, 1:n + 1] = torch.from_numpy(s["cls_prob"][:n])
                # Stored densely (k = all classes) there is no index: class j is column j.
                class_index[i, 1:n + 1] = torch.from_numpy(s["cls_index"][:n].view(np.int16)) \
                    if "cls_index" in s else torch.arange(k, dtype=torch.int16)
        maskable_regions = region_mask.bool()
        maskable_regions[:, 0] = False  # never the IMG token
        feature_targets = None if kl else features.clone()
        masked_regions = mask_regions(features, maskable_regions, self.generator)
        return Batch(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                     region_features=features, region_locations=locations, region_mask=region_mask,
                     masked_lm_labels=mlm_labels, masked_lm_positions=labelled_positions(mlm_labels),
                     masked_regions=masked_regions,
                     alignment_labels=torch.tensor([s["alignment_label"] for s in samples]),
                     num_classes=self.num_classes, class_index=class_index, class_prob=class_prob,
                     feature_targets=feature_targets,
                     keys=[s["key"] for s in samples], real_tokens=int(attention_mask.sum()))
