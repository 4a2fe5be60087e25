"""VCR task shards from the public files: the annotation JSONL files (train.jsonl, val.jsonl,
test.jsonl), the per-image metadata JSON of `vcr1images/` (the ground-truth boxes and their
class names), and detector features of the images; optionally features at the ground-truth
boxes, added to the regions (as the paper does).

Each sample is one image: its regions once (the detector's, then the ground-truth boxes'),
every question about it in `meta["questions"]` (annot_id, the question, the 4 answers and 4
rationales as VCR's token lists, their labels where the split has them), the ground-truth
boxes' class names in `meta["names"]` (object tags in the text point into them) and how many
ground-truth regions end the regions in `meta["gt_regions"]`. Features are keyed by VCR's
`img_id` ("train-123": a TSV's image_id column, or a feature file's name).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from shards.build import ShardOptions
from shards.sources import InputError
from shards.task_sets import TaskSets, write_task_sets

QUESTION_FIELDS = ("annot_id", "question", "answer_choices", "rationale_choices", "answer_label", "rationale_label")
LABELLED_EXAMPLES, UNLABELLED_EXAMPLES = 2, 5  # Q->A + QA->R; Q->A + QA->R given each of the 4 answers

VCR_SETS = TaskSets(task="vcr", meta_key="questions", fields=QUESTION_FIELDS,
                    text=lambda q: " ".join(t if isinstance(t, str) else "[obj]" for t in q["question"]),
                    noun="question", key=str,
                    examples=lambda q: LABELLED_EXAMPLES if "answer_label" in q else UNLABELLED_EXAMPLES)


def read_annotations(path: str | Path) -> list[dict]:
    """The question records of a VCR JSONL file, checked for the fields the task reads."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            missing = [f for f in ("img_id", "metadata_fn", *QUESTION_FIELDS[:4]) if f not in record]
        except (json.JSONDecodeError, TypeError) as e:
            raise InputError(f"{path}:{number}: not a JSON record ({e})") from None
        if missing:
            raise InputError(f"{path}:{number}: lacks {', '.join(missing)}")
        if ("answer_label" in record) != ("rationale_label" in record):
            raise InputError(f"{path}:{number}: has only one of answer_label and rationale_label")
        records.append({**record, "image_id": str(record["img_id"])})
    return records


def read_metadata(path: str | Path) -> dict:
    """An image's metadata JSON: its ground-truth boxes (x1, y1, x2, y2[, score]) and their names."""
    try:
        metadata = json.loads(Path(path).read_text())
        boxes = np.asarray(metadata["boxes"], np.float32).reshape(-1, len(metadata["boxes"][0]) if
                                                                   metadata["boxes"] else 5)[:, :4]
        names = [str(n) for n in metadata["names"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, IndexError) as e:
        raise InputError(f"{path}: not a VCR metadata file with boxes and names ({type(e).__name__}: {e})") from None
    if len(boxes) != len(names):
        raise InputError(f"{path}: {len(boxes)} boxes but {len(names)} names")
    return {"boxes": boxes, "names": names}


def metadata_files(splits: dict[str, list[dict]], images_dir: str | Path):
    """img_id -> its metadata (`read_metadata` of the records' `metadata_fn` under `images_dir`)."""
    files = {r["image_id"]: Path(images_dir) / r["metadata_fn"] for records in splits.values() for r in records}
    return lambda key: read_metadata(files[key])


def write_vcr_sets(splits: dict[str, list[dict]], metadata, source, out: str | Path, options: ShardOptions, *,
                   gt_source=None, prepare=lambda record: record, max_regions: int = 100, source_name: str = "",
                   lenient: bool = False) -> dict[str, dict]:
    """Write one shard set per split under `out` (`shards.task_sets.write_task_sets`).
    `metadata(img_id)`: the image's ground-truth boxes and names (`metadata_files`);
    `prepare(record)`: box selection of the detector's regions; `gt_source`: features at the
    ground-truth boxes (a reader like `source`, rows in the metadata's order), appended to
    every split's regions."""
    gt_ids = set(gt_source.ids) if gt_source is not None else set()

    def regions(record: dict, name: str, key: str) -> dict:
        truth = metadata(key)
        record = prepare(record)
        gt = 0
        if gt_source is not None:
            if key not in gt_ids:
                raise InputError(f"image {key} has no ground-truth box features")
            extra = gt_source.load(key)
            if len(extra["boxes"]) != len(truth["boxes"]):
                raise InputError(f"image {key}: {len(extra['boxes'])} ground-truth feature rows for "
                                 f"{len(truth['boxes'])} metadata boxes")
            record = {**record, "features": np.concatenate([record["features"], extra["features"]]),
                      "boxes": np.concatenate([record["boxes"], truth["boxes"]])}
            gt = len(truth["boxes"])
        return {**record, "meta": {"names": truth["names"], "gt_regions": gt}}

    return write_task_sets(VCR_SETS, splits, source, out, options, prepare=regions, max_regions=max_regions,
                           index_task=lambda name: {"ground_truth_boxes": gt_source is not None},
                           source_name=source_name, lenient=lenient)
