"""Toy-world referring expressions: "the small red dog to the left of the car", over the
pretend detector's proposals, written by the same converter as RefCOCO+ (`shards.refcoco`).

Each expression names one object of a scene so that no other object fits it: its class, then
as much as it takes of its colour, its size and where it is relative to another object
(with some chance, more than it takes, as people over-specify). The referred box is the
object's true box; the detector's proposals hold a tight box around every object (IoU 1)
and looser ones, so the toy splits need no ground-truth boxes added. Images are new
toy-world images (from `REFER_FIRST_IMAGE` on), never among those a toy pretraining saw;
the splits are train and val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.build import ShardOptions
from shards.refcoco import write_refer_sets
from shards.toyworld import GeneratedImages, WorldOptions, relation, task_images

REFER_FIRST_IMAGE = 2_000_000
EXPRESSIONS_PER_IMAGE = 3
EXTRA_WORD = 0.3  # the chance of naming an attribute that is not needed


def expression_for(objects: list[dict], target: int, rng: np.random.Generator) -> str | None:
    """An expression that fits `objects[target]` and no other object of the scene (None if
    the scene has no such words: two objects alike in class, colour and size, placed alike)."""
    me, others = objects[target], [o for i, o in enumerate(objects) if i != target]

    def alike(o: dict, attributes: list[str]) -> bool:
        return all(o[a] == me[a] for a in attributes)

    def where(o: dict, landmark: dict) -> str:
        return relation(np.array(o["box"]), np.array(landmark["box"]))

    attributes = ["name"]
    for attribute in ("colour", "size"):
        if any(alike(o, attributes) for o in others) or rng.random() < EXTRA_WORD:
            attributes.append(attribute)
    still_alike = [o for o in others if alike(o, attributes)]
    phrase = "the " + " ".join(me[a] for a in ("size", "colour", "name") if a in attributes)
    if not still_alike and (not others or rng.random() >= EXTRA_WORD):
        return phrase
    names = [o["name"] for o in objects]
    landmarks = [o for o in others if names.count(o["name"]) == 1  # "the car" must be one object
                 and all(where(a, o) != where(me, o) for a in still_alike if a is not o)]
    if not landmarks:
        return None
    landmark = landmarks[int(rng.integers(len(landmarks)))]
    return f"{phrase} {where(me, landmark)} the {landmark['name']}"


def write_toy_refcoco(out: str | Path, train_images: int, val_images: int, *, seed: int = 0,
                      feature_dim: int = 2048, options: ShardOptions | None = None,
                      world: WorldOptions | None = None) -> dict[str, dict]:
    """Write `out/train` and `out/val` toy referring-expression shard sets (images of the toy
    world of `seed` with `world`'s options: give the ones of the world the model was
    pretrained on)."""
    world, options = world or WorldOptions(), options or ShardOptions(samples_per_shard=250)
    rng = np.random.default_rng([seed, 0x4EF])
    splits, images, sent_id = {"train": [], "val": []}, {}, 0
    for split, record in task_images(seed, feature_dim, world, REFER_FIRST_IMAGE, train_images, val_images,
                                     "toy refcoco"):
        images[record["image_id"]] = record
        objects = record["scene"]["objects"]
        for target in rng.permutation(len(objects))[:EXPRESSIONS_PER_IMAGE]:
            expression = expression_for(objects, int(target), rng)
            if expression is not None:
                splits[split].append({"image_id": record["image_id"], "ref_id": sent_id, "sent_id": sent_id,
                                      "expression": expression, "box": objects[target]["box"]})
                sent_id += 1
    return write_refer_sets(splits, GeneratedImages(images), out, options,
                            max_regions=max(len(r["boxes"]) for r in images.values()),
                            source_name=f"toyworld seed={seed} {world.describe()} images {REFER_FIRST_IMAGE}+")
