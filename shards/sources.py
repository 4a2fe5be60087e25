"""Readers for what detectors and caption datasets give us, all yielding one record type.

A record is a dict: image_id, image_w, image_h, features [N, F] float32, boxes [N, 4]
(pixels), and cls_prob [N, C] when the detector wrote its class distribution.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

TSV_FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob"]


class InputError(ValueError):
    """An input record that cannot be written; the message names its file, line or image."""


class Skipped:
    """Problems with inputs: an InputError at the first one, or with `lenient`, counted and
    summarised at the end (the first few named)."""

    SHOWN = 5

    def __init__(self, lenient: bool):
        self.lenient, self.count, self.examples = lenient, 0, []

    def add(self, problem: str, count: int = 1) -> None:
        if not self.lenient:
            raise InputError(f"{problem} (pass --lenient to skip and count such inputs)")
        self.count += count
        if len(self.examples) < self.SHOWN:
            self.examples.append(problem)

    def summary(self) -> str:
        return f"{self.count} inputs skipped" + "".join(f"\n  {e}" for e in self.examples)

    def report(self) -> None:
        if self.count:
            print(f"warning: {self.summary()}", file=sys.stderr)


def _b64_array(text: str, rows: int, name: str) -> np.ndarray:
    values = np.frombuffer(base64.b64decode(text, validate=True), dtype=np.float32)
    if rows <= 0 or values.size % rows:
        raise ValueError(f"{name}: {values.size} float32 values do not make {rows} rows (num_boxes)")
    return values.reshape(rows, -1)


class TsvSource:
    """Bottom-up-attention TSV files (`image_id, image_w, image_h, num_boxes, boxes,
    features[, cls_prob]`, arrays as base64 float32). One pass records where each image's
    line starts, so images can then be read in any (shuffled) order. A line that cannot be
    read is an InputError naming file, line and image."""

    def __init__(self, paths: list[str | Path]):
        csv.field_size_limit(sys.maxsize)
        self.offsets: dict[str, tuple[Path, int, int]] = {}
        for path in map(Path, paths):
            with open(path, "rb") as f:
                offset = 0
                for number, line in enumerate(f, 1):
                    if line.strip():
                        image_id = line.split(b"\t", 1)[0].decode("utf-8", "replace")
                        if image_id in self.offsets:
                            first, first_line, _ = self.offsets[image_id]
                            raise InputError(f"{path}:{number}: image {image_id} again (first at {first}:{first_line})")
                        self.offsets[image_id] = (path, number, offset)
                    offset += len(line)

    @property
    def ids(self) -> list[str]:
        return list(self.offsets)

    def load(self, image_id: str) -> dict:
        path, number, offset = self.offsets[image_id]
        with open(path, newline="") as f:
            f.seek(offset)
            row = next(csv.reader([f.readline()], delimiter="\t"))
        try:
            if len(row) < 6:
                raise ValueError(f"{len(row)} fields, expected {', '.join(TSV_FIELDS[:6])}[, cls_prob]")
            fields = dict(zip(TSV_FIELDS, row))
            n = int(fields["num_boxes"])
            record = dict(image_id=fields["image_id"], image_w=int(float(fields["image_w"])),
                          image_h=int(float(fields["image_h"])), boxes=_b64_array(fields["boxes"], n, "boxes"),
                          features=_b64_array(fields["features"], n, "features"))
            if record["boxes"].shape[1] != 4:
                raise ValueError(f"boxes: {record['boxes'].shape[1]} values per box for num_boxes={n}, expected 4")
            if fields.get("cls_prob"):
                record["cls_prob"] = _b64_array(fields["cls_prob"], n, "cls_prob")
        except (ValueError, TypeError, binascii.Error) as e:
            raise InputError(f"{path}:{number}: image {image_id}: {e}") from None
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
            fields = dict(raw.items()) if path.suffix == ".npz" else raw.item()
        except ValueError as e:
            if "pickle" in str(e):
                raise InputError(f"{path} holds pickled objects; pass --allow-pickle if you trust it") from None
            raise InputError(f"{path}: not a feature file ({e})") from None
        except (OSError, EOFError, zipfile.BadZipFile, AttributeError) as e:
            raise InputError(f"{path}: not a feature file ({type(e).__name__}: {e})") from None
        boxes = fields.get("bbox", fields.get("boxes"))
        if boxes is None or "features" not in fields:
            raise InputError(f"{path}: needs 'features' and 'bbox' or 'boxes'")
        try:
            boxes, features = np.asarray(boxes, np.float32), np.asarray(fields["features"], np.float32)
            n = int(fields.get("num_boxes", len(boxes)))  # extractors may pad the arrays past num_boxes
            if len(boxes) != len(features) or not 0 < n <= len(boxes):
                raise ValueError(f"num_boxes={n} but {len(boxes)} boxes and {len(features)} feature rows")
            record = dict(image_id=str(fields.get("image_id", image_id)), image_w=int(fields["image_w"]),
                          image_h=int(fields["image_h"]), boxes=boxes[:n], features=features[:n])
            if fields.get("cls_prob") is not None:
                record["cls_prob"] = np.asarray(fields["cls_prob"], np.float32)[:n]
            if fields.get("objects") is not None:
                record["objects"] = np.asarray(fields["objects"]).tolist()
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{path}: {type(e).__name__}: {e}") from None
        return record


def read_captions(path: str | Path) -> dict[str, list[str]]:
    """Image id -> captions, from JSON (`{id: caption | [captions]}`, a list of
    `{image_id, caption}`, or COCO's `{"annotations": [...]}`) or JSONL (one
    `{image_id, caption | captions}` per line)."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            entries = []
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip():
                    try:
                        entries.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InputError(f"{path}:{number}: not JSON ({e})") from None
        else:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and "annotations" in data:
                entries = data["annotations"]
            elif isinstance(data, dict):
                entries = [{"image_id": k, "captions": v if isinstance(v, list) else [v]} for k, v in data.items()]
            else:
                entries = data
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read captions ({e})") from None
    captions: dict[str, list[str]] = {}
    for number, entry in enumerate(entries if isinstance(entries, list) else [entries], 1):
        texts = entry.get("captions", [entry.get("caption")]) if isinstance(entry, dict) else None
        if not isinstance(texts, list) or "image_id" not in entry or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{path}: entry {number} ({str(entry)[:80]}) is not {{image_id, caption | captions}} "
                             "with string captions")
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
