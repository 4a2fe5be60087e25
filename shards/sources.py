"""Readers for what detectors and caption datasets give us, all yielding one record type.

A record is a dict: image_id, image_w, image_h, features [N, F] float32, boxes [N, 4]
(pixels), and cls_prob [N, C] when the detector wrote its class distribution.
"""

from __future__ import annotations

import base64
import csv
import json
import sys
from pathlib import Path

import numpy as np

TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"]


def _b64_array(text: str, rows: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).reshape(rows, -1)


class TsvSource:
    """Bottom-up-attention TSV files (`image_id, image_w, image_h, num_boxes, boxes,
    features[, cls_prob]`, arrays as base64 float32). One pass records where each image's
    line starts, so images can then be read in any (shuffled) order."""

    def __init__(self, paths: list[str | Path]):
        csv.field_size_limit(sys.maxsize)
        self.offsets: dict[str, tuple[Path, int]] = {}
        for path in map(Path, paths):
            with open(path, "rb") as f:
                offset = 0
                for line in f:
                    if line.strip():
                        self.offsets[line.split(b"\t", 1)[0].decode()] = (path, offset)
                    offset += len(line)

    @property
    def ids(self) -> list[str]:
        return list(self.offsets)

    def load(self, image_id: str) -> dict:
        path, offset = self.offsets[image_id]
        with open(path, newline="") as f:
            f.seek(offset)
            row = next(csv.reader([f.readline()], delimiter="\t"))
        fields = dict(zip(TSV_FIELDS, row))
        n = int(fields["num_boxes"])
        record = dict(image_id=fields["image_id"], image_w=int(float(fields["image_w"])),
                      image_h=int(float(fields["image_h"])), boxes=_b64_array(fields["boxes"], n),
                      features=_b64_array(fields["features"], n))
        if fields.get("cls_prob"):
            record["cls_prob"] = _b64_array(fields["cls_prob"], n)
        return record


class FeatureFolderSource:
    """A folder of per-image `.npz` or `.npy` files as Faster R-CNN extractors write them
    (keys `features`, `bbox` or `boxes`, `num_boxes`, `image_w`, `image_h`, optional
    `cls_prob`, `objects`). `.npy` files that hold a pickled dict (what the official
    extractor writes) are read only with `allow_pickle=True`, since unpickling runs code."""

    def __init__(self, directory: str | Path, allow_pickle: bool = False):
        self.files = {p.stem: p for p in sorted(Path(directory).iterdir()) if p.suffix in (".npy", ".npz")}
        self.allow_pickle = allow_pickle

    @property
    def ids(self) -> list[str]:
        return list(self.files)

    def load(self, image_id: str) -> dict:
        path = self.files[image_id]
        try:
            raw = np.load(path, allow_pickle=self.allow_pickle)
        except ValueError as e:
            raise ValueError(f"{path} holds pickled objects; pass --allow-pickle if you trust it ({e})") from None
        fields = dict(raw.items()) if path.suffix == ".npz" else raw.item()
        boxes = fields.get("bbox", fields.get("boxes"))
        if boxes is None or "features" not in fields:
            raise ValueError(f"{path}: needs 'features' and 'bbox' or 'boxes'")
        n = int(fields.get("num_boxes", len(boxes)))
        record = dict(image_id=str(fields.get("image_id", image_id)), image_w=int(fields["image_w"]),
                      image_h=int(fields["image_h"]), boxes=np.asarray(boxes, np.float32)[:n],
                      features=np.asarray(fields["features"], np.float32)[:n])
        if fields.get("cls_prob") is not None:
            record["cls_prob"] = np.asarray(fields["cls_prob"], np.float32)[:n]
        if fields.get("objects") is not None:
            record["objects"] = np.asarray(fields["objects"]).tolist()
        return record


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """Image id -> captions, from JSON (`{id: caption | [captions]}`, a list of
    `{image_id, caption}`, or COCO's `{"annotations": [...]}`) or JSONL (one
    `{image_id, caption | captions}` per line)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "annotations" in data:
            entries = data["annotations"]
        elif isinstance(data, dict):
            entries = [{"image_id": k, "captions": v if isinstance(v, list) else [v]} for k, v in data.items()]
        else:
            entries = data
    captions: dict[str, list[str]] = {}
    for entry in entries:
        texts = entry.get("captions", [entry["caption"]] if "caption" in entry else [])
        captions.setdefault(str(entry["image_id"]), []).extend(texts)
    return captions


def select_boxes(record: dict, min_boxes: int, max_boxes: int, conf_threshold: float) -> dict:
    """Keep the boxes whose detector confidence (best non-background class) passes the
    threshold, at least `min_boxes` and at most `max_boxes` of them, most confident first,
    as the paper does (10 to 36). Without a class distribution the extractor's order is kept."""
    n = len(record["boxes"])
    if "cls_prob" in record:
        confidence = record["cls_prob"][:, 1:].max(1)
        order = np.argsort(-confidence, kind="stable")
        keep = int(np.clip((confidence >= conf_threshold).sum(), min_boxes, max_boxes))
        chosen = np.sort(order[:keep])
    else:
        chosen = np.arange(min(n, max_boxes))
    out = dict(record)
    for name in ("boxes", "features", "cls_prob"):
        if name in record:
            out[name] = record[name][chosen]
    return out
