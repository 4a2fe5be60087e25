"""Image-retrieval task shards (Flickr30k, and COCO, in Karpathy's split) from the public files:
Karpathy's `dataset_flickr30k.json` (images with their split and sentences) and the images'
detector features (bottom-up TSV, or per-image .npz/.npy).

Each sample is one image: its regions once, its captions as the sample's captions (their
sentence ids in `meta["sentences"]`). One shard set per split: train (with Karpathy's
`restval`, as is usual for COCO), val and test (Flickr30k: 29,000 / 1,014 / 1,000 images,
5 captions each). The train set gets its hard negatives (`shards.neighbours`) beside it.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from shards.build import ShardOptions
from shards.neighbours import write_hard_negatives
from shards.sources import InputError
from shards.task_sets import TaskSets, write_task_sets

TASK_NAME = "retrieval"  # vilbert/tasks/retrieval.py
TRAIN = "train"
SPLITS = {"train": TRAIN, "restval": TRAIN, "val": "val", "test": "test"}  # Karpathy's split -> our set


def read_karpathy(path: str | Path) -> dict[str, list[dict]]:
    """Set -> caption records (image_id: the file name without its extension, sent_id, caption:
    the sentence's `raw` text), from a Karpathy-split dataset JSON."""
    try:
        images = json.loads(Path(path).read_text())["images"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a Karpathy-split dataset JSON with images ({type(e).__name__}: {e})") from None
    sets = defaultdict(list)
    for number, image in enumerate(images):
        try:
            if image["split"] not in SPLITS:
                raise InputError(f"{path}: image [{number}] has split {image['split']!r}, not one of {sorted(SPLITS)}")
            for sentence in image["sentences"]:
                if not isinstance(sentence["raw"], str) or not sentence["raw"].strip():
                    raise TypeError(f"sentence {sentence.get('sentid')} has no text")
                sets[SPLITS[image["split"]]].append({"image_id": Path(image["filename"]).stem,
                                                     "sent_id": sentence["sentid"], "caption": sentence["raw"]})
        except (KeyError, TypeError) as e:
            raise InputError(f"{path}: image [{number}] ({str(image)[:80]}) is not a Karpathy record with filename, "
                             f"split and sentences (raw, sentid) ({type(e).__name__}: {e})") from None
    return dict(sets)


RETRIEVAL_SETS = TaskSets(task=TASK_NAME, meta_key="sentences", fields=("sent_id",), text=lambda r: r["caption"],
                          noun="caption")


def write_retrieval_sets(sets: dict[str, list[dict]], source, out: str | Path, options: ShardOptions, *,
                         prepare=lambda record: record, max_regions: int = 100, source_name: str = "",
                         lenient: bool = False) -> dict[str, dict]:
    """Write one shard set per entry of `sets` under `out` (`shards.task_sets.write_task_sets`),
    and the train set's hard negatives beside it; `prepare(record)`: box selection."""
    report = write_task_sets(RETRIEVAL_SETS, sets, source, out, options,
                             prepare=lambda record, name, key: prepare(record), max_regions=max_regions,
                             source_name=source_name, lenient=lenient)
    if TRAIN in report:
        write_hard_negatives(Path(out) / TRAIN)
    return report
