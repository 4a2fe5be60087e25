"""Turn records (detector output + captions) into train/val shard sets."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shards.sources import InputError, Skipped
from shards.writer import ShardSetWriter, all_or_nothing
from vilbert.data.errors import BadSample
from vilbert.data.sample_codec import compact_class_distribution, decode_sample, encode_sample, validate_sample
from vilbert.data.shard_index import ShardIndex

SPLITS = ("train", "val")


@dataclass
class ShardOptions:
    samples_per_shard: int = 1000
    max_shard_bytes: int | None = None
    val_fraction: float = 0.0
    seed: int = 0
    feature_dtype: str = "float16"
    class_topk: int = 32
    prefix: str = "shard"


def split_of(image_id: str, val_fraction: float, seed: int) -> str:
    """Train or val, by a hash of the image id: stable across runs, machines and sources."""
    digest = hashlib.sha1(f"{seed}:{image_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2 ** 64 < val_fraction else "train"


def encode_record(record: dict, captions: list[str], options: ShardOptions, key: str, meta: dict | None = None):
    arrays = {"features": record["features"].astype(options.feature_dtype, copy=False),
              "boxes": record["boxes"].astype(np.float32, copy=False)}
    if "cls_prob" in record:
        index, arrays["cls_prob"] = compact_class_distribution(record["cls_prob"], options.class_topk)
        if index is not None:
            arrays["cls_index"] = index
    meta = dict(meta or {})
    if "objects" in record:
        meta["objects"] = record["objects"]
    return encode_sample(key, record["image_id"], captions, record["image_w"], record["image_h"], arrays, meta)


def write_shard_sets(ids: list[str], load, captions: dict[str, list[str]], out: str | Path, options: ShardOptions,
                     *, source: str, prepare=lambda record: record, class_names: list[str] | None = None,
                     max_regions: int = 36, lenient: bool = False) -> dict[str, ShardIndex]:
    """Write `out/train` (and `out/val` when val_fraction > 0) from the images `ids`, read
    with `load(id)` and passed through `prepare` (box selection). Order: a deterministic
    shuffle by `options.seed`. Inputs that are wrong but parse (captions without an image,
    images without captions, an image that cannot be read or whose features differ in width
    from the first image's) are errors naming the image; with `lenient`, such images are
    skipped and counted instead. Nothing is in place until every split is complete."""
    skipped = Skipped(lenient)
    unmatched = sorted(set(captions) - set(ids))
    if unmatched:
        skipped.add(f"{len(unmatched)} captioned images have no features (e.g. image {unmatched[0]})", len(unmatched))
    ids = sorted(ids)
    random.Random(options.seed).shuffle(ids)
    writers, feature_dim, num_classes = {}, None, None
    with all_or_nothing() as staged:
        for image_id in tqdm(ids, desc=f"writing shards to {out}", unit="img"):
            if not captions.get(image_id):
                skipped.add(f"image {image_id} has no caption")
                continue
            try:
                record = prepare(load(image_id))
                data = encode_record(record, captions[image_id], options, key=image_id)
                if feature_dim is None:
                    feature_dim = record["features"].shape[1]
                    num_classes = record["cls_prob"].shape[1] if "cls_prob" in record else 0
                checked(data, image_id, feature_dim, num_classes)
            except InputError as e:
                skipped.add(str(e))
                continue
            split = split_of(image_id, options.val_fraction, options.seed)
            if split not in writers:
                writers[split] = ShardSetWriter(
                    Path(out) / split, prefix=options.prefix, max_samples=options.samples_per_shard,
                    max_bytes=options.max_shard_bytes, feature_dim=feature_dim, num_classes=num_classes,
                    class_topk=min(options.class_topk, num_classes), feature_dtype=options.feature_dtype,
                    max_regions=max_regions, source=source, class_names=class_names or [])
                staged.append(writers[split])
            writers[split].write(image_id, data)
        if not writers:
            raise InputError(f"no image had both features and captions: nothing written ({skipped.summary()})")
        indexes = {split: writer.finish() for split, writer in writers.items()}
    skipped.report()
    return indexes


def checked(data: bytes, image_id: str, feature_dim: int | None, num_classes: int | None) -> bytes:
    """An encoded sample that passed the reader's own checks (`validate_sample`: shapes that
    agree, the shard set's feature width and class count, finite values, boxes inside the
    image), so a writer never writes what training would skip; else InputError."""
    try:
        validate_sample(decode_sample(data), feature_dim, num_classes)
    except BadSample as e:
        raise InputError(f"image {image_id}: {e}") from None
    return data
