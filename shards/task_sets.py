"""Task shard sets: one sample per image, its regions once and the task's records about it
(VQA questions, referring expressions, ...) in its `meta`, so a record costs its text, not a
copy of the features. Every task converter (`shards.vqa`, `shards.refcoco`) writes through
`write_task_sets`."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from shards.build import ShardOptions, checked
from shards.sources import InputError, Skipped
from shards.writer import ShardSetWriter, all_or_nothing
from vilbert.data.sample_codec import encode_sample


def image_key(image_id) -> str:
    """COCO ids appear as 262145, "262145" or "COCO_train2014_000000262145": the trailing number."""
    match = re.search(r"(\d+)$", str(image_id))
    if match is None:
        raise ValueError(f"image id {image_id!r} ends in no number")
    return str(int(match.group(1)))


@dataclass
class TaskSets:
    """What a task's shard sets hold, besides the records: the task's name, the key of the
    records in `meta`, their fields kept there, the text of a record (the sample's captions),
    the noun for one record in reports, how a record's image id names its image in the
    features (`key`), and how many examples a record gives the task (the index counts them:
    epochs are passes over examples)."""
    task: str
    meta_key: str
    fields: tuple[str, ...]
    text: Callable[[dict], str]
    noun: str
    key: Callable[[object], str] = image_key
    examples: Callable[[dict], int] = lambda record: 1


def write_task_sets(kind: TaskSets, sets: dict[str, list[dict]], source, out: str | Path, options: ShardOptions, *,
                    index_task: Callable[[str], dict] = lambda name: {},
                    prepare: Callable[[dict, str, str], dict] = lambda record, name, key: record,
                    max_regions: int = 100, source_name: str = "", lenient: bool = False) -> dict[str, dict]:
    """Write one shard set per entry of `sets` (name -> records, each with an `image_id`) under
    `out`; `source` has `ids` and `load(id)` (a `shards.sources` reader), and `prepare(record,
    set name, image key)` turns what it loads into the regions to write (box selection, added
    ground-truth boxes), and may add to the sample's `meta` under `"meta"`.
    `index_task(name)`: more fields of the set's index `task` section.
    Returns per set: records, examples, images, bytes, and images without features. Images without
    features, or whose features cannot be read or are wrong, are errors; with `lenient`, their
    records are left out, and counted. Nothing is in place until every set is complete."""
    features_of = {kind.key(i): i for i in source.ids}
    skipped, report = Skipped(lenient), {}
    with all_or_nothing() as writers:
        for name, records in sets.items():
            by_image = defaultdict(list)
            for record in records:
                by_image[kind.key(record["image_id"])].append(record)
            absent = sorted(k for k in by_image if k not in features_of)
            if len(absent) == len(by_image):
                raise InputError(f"{name}: none of its {len(by_image)} images has features in "
                                 f"{source_name or 'the source'} (e.g. image {absent[0]}): are the features for the "
                                 "same images?")
            if absent:
                skipped.add(f"{name}: {len(absent)} images have no features (e.g. image {absent[0]}); their "
                            f"{kind.noun}s are left out", len(absent))
            kept = [k for k in by_image if k in features_of]
            writer = ShardSetWriter(Path(out) / name, prefix=options.prefix, max_samples=options.samples_per_shard,
                                    max_bytes=options.max_shard_bytes, feature_dim=0, num_classes=0, class_topk=0,
                                    feature_dtype=options.feature_dtype, max_regions=max_regions, source=source_name,
                                    task={"name": kind.task, "split": name, **index_task(name)})
            writers.append(writer)
            written = []
            for key in tqdm(kept, desc=f"{kind.task} {name}", unit="img"):
                try:
                    image = prepare(source.load(features_of[key]), name, key)
                    feature_dim = writer.index_fields["feature_dim"] or image["features"].shape[1]
                    meta = {**image.get("meta", {}),
                            kind.meta_key: [{f: r[f] for f in kind.fields if f in r} for r in by_image[key]]}
                    arrays = {"features": image["features"].astype(options.feature_dtype, copy=False),
                              "boxes": image["boxes"].astype("float32", copy=False)}
                    data = checked(encode_sample(key, key, [kind.text(r) for r in by_image[key]], image["image_w"],
                                                 image["image_h"], arrays, meta), key, feature_dim, 0)
                except InputError as e:
                    skipped.add(f"{name}: {e}")
                    continue
                writer.index_fields["feature_dim"] = feature_dim
                writer.write(key, data)
                written.append(key)
            writer.index_fields["task"]["examples"] = sum(kind.examples(r) for k in written for r in by_image[k])
            index = writer.finish()
            records, size = sum(len(by_image[k]) for k in written), sum(s.bytes for s in index.shards)
            report[name] = {"records": records, "noun": kind.noun, "examples": index.task["examples"],
                            "images": len(written), "images_without_features": len(absent), "bytes": size,
                            "bytes_per_record": size / max(records, 1)}
    skipped.report()
    return report
