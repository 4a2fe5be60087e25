"""Referring-expression task shards (RefCOCO+, RefCOCO, RefCOCOg) from the public files: the
`refs(unc).p` pickle and `instances.json` of the refer toolkit's data, and the images'
detector features (bottom-up TSV, or per-image .npz/.npy), optionally with features of the
ground-truth boxes for the training split.

Each sample is one image: its regions once, and every expression about it in `meta["refs"]`
(ref_id, sent_id, the expression, the referred object's box as x1, y1, x2, y2 pixels). One
shard set per split of the refs (train, val, testA, testB for RefCOCO+ unc). As the official
code: the train split's regions are the detector's plus the ground-truth boxes (when their
features are given); the other splits' are the detector's only.

`refs(unc).p` is a Python pickle, and unpickling an untrusted pickle can run any code. It is
read by `read_pickle`, which builds plain containers only (dict, list, tuple, str, numbers)
and refuses every pickle that names a class or function, before anything of it runs.
"""

from __future__ import annotations

import json
import pickle
from collections import defaultdict
from pathlib import Path

import numpy as np

from shards.build import ShardOptions
from shards.sources import InputError
from shards.task_sets import TaskSets, image_key, write_task_sets

TASK_NAME = "refcoco"  # vilbert/tasks/refcoco.py
TRAIN = "train"  # the split whose regions include the ground-truth boxes


class _PlainUnpickler(pickle.Unpickler):
    """Builds what pickle opcodes build by themselves (dict, list, tuple, str, bytes, int, float,
    bool, None); a pickle that names any class or function (the only way one runs code) is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"it names {module}.{name}; only plain containers are read")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it has persistent ids; only plain containers are read")


def read_pickle(path: str | Path):
    """A pickle of plain containers (the refer toolkit's `refs(*).p`), without running anything:
    an InputError for a pickle that names a class or function, or that is damaged. Python 2
    byte strings come back as text (UTF-8)."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="utf-8").load()
    except pickle.UnpicklingError as e:
        raise InputError(f"{path}: refused ({e})") from None
    except (OSError, EOFError, ValueError, UnicodeDecodeError, IndexError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None


def _xyxy(bbox) -> list[float]:
    """COCO's [x, y, width, height] -> [x1, y1, x2, y2] (the official `x + w`, `y + h`)."""
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def read_refs(refs_path: str | Path, instances_path: str | Path) -> dict[str, list[dict]]:
    """Split -> expression records (image_id, ref_id, sent_id, expression: the sentence's `raw`
    text, box: the referred annotation's box as x1, y1, x2, y2), one per sentence of each ref."""
    refs = read_pickle(refs_path)
    try:
        annotations = json.loads(Path(instances_path).read_text())["annotations"]
        boxes = {a["id"]: _xyxy(a["bbox"]) for a in annotations}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise InputError(f"{instances_path}: not a COCO instances file with annotations (id, bbox) "
                         f"({type(e).__name__}: {e})") from None
    if not isinstance(refs, list):
        raise InputError(f"{refs_path}: holds a {type(refs).__name__}, not the list of refs")
    splits = defaultdict(list)
    for number, ref in enumerate(refs):
        try:
            if ref["ann_id"] not in boxes:
                raise InputError(f"{refs_path}: ref {ref['ref_id']}: annotation {ref['ann_id']} is not in "
                                 f"{instances_path}: are they of the same dataset?")
            for sentence in ref["sentences"]:
                expression = sentence["raw"]
                if not isinstance(expression, str) or not isinstance(sentence["sent_id"], int):
                    raise TypeError(f"sentence {str(sentence)[:60]} has no text raw and integer sent_id")
                splits[str(ref["split"])].append({"image_id": ref["image_id"], "ref_id": ref["ref_id"],
                                                  "sent_id": sentence["sent_id"], "expression": expression,
                                                  "box": boxes[ref["ann_id"]]})
        except (KeyError, TypeError) as e:
            raise InputError(f"{refs_path}: ref [{number}] ({str(ref)[:80]}) is not a refer-toolkit ref with "
                             f"ref_id, ann_id, image_id, split and sentences ({type(e).__name__}: {e})") from None
    return dict(splits)


REFER_SETS = TaskSets(task=TASK_NAME, meta_key="refs", fields=("ref_id", "sent_id", "expression", "box"),
                      text=lambda e: e["expression"], noun="expression")


def write_refer_sets(splits: dict[str, list[dict]], source, out: str | Path, options: ShardOptions, *,
                     gt_source=None, prepare=lambda record: record, max_regions: int = 100, source_name: str = "",
                     lenient: bool = False) -> dict[str, dict]:
    """Write one shard set per split under `out` (`shards.task_sets.write_task_sets`);
    `prepare(record)`: box selection of the detector's regions. `gt_source` (a reader like
    `source`, of the ground-truth boxes' features): added to the train split's regions; an
    image of the train split without them is an error (with `lenient`, left out and counted)."""
    gt_of = {image_key(i): i for i in gt_source.ids} if gt_source is not None else {}

    def regions(record: dict, name: str, key: str) -> dict:
        record = prepare(record)
        if name != TRAIN or gt_source is None:
            return record
        if key not in gt_of:
            raise InputError(f"image {key} has no ground-truth box features")
        gt = gt_source.load(gt_of[key])
        return {**record, "features": np.concatenate([record["features"], gt["features"]]),
                "boxes": np.concatenate([record["boxes"], gt["boxes"]])}

    return write_task_sets(REFER_SETS, splits, source, out, options, prepare=regions, max_regions=max_regions,
                           index_task=lambda name: {"ground_truth_boxes": name == TRAIN and gt_source is not None},
                           source_name=source_name, lenient=lenient)
