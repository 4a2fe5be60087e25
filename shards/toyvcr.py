"""Toy-world VCR: 4-way questions with 4-way rationales about toy-world scenes, in VCR's
token lists (object tags point into the image's ground-truth boxes), written by the same
converter as VCR (`shards.vcr`).

    question   "what is in this picture ?"   answers: "a [0]", "a bus", "a kite", "a lamp"
    rationale  given the answer: "[0] is next to [1]", "[0] is next to cup", ...

An object tag becomes the object's class name, as VCR's tags do for objects that are not
people, so the text never tells a tag from a word: the right answer names an object of the
scene and the three others classes that are not in it; the right rationale names a second
object of the scene, the three others absent classes. Both ask what the regions show (the
objects' classes, which a toy pretraining learns to see); colour and spatial relations,
which it does not (docs/toy-transfer.md), are left out. The ground-truth boxes are the
objects' boxes; their features are the pretend detector's tight box of each object (a ground-truth
box run through the same detector), added after the detector's regions as VCR's are.
Images are new toy-world images (from `VCR_FIRST_IMAGE` on); the splits are train and val.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shards.build import ShardOptions
from shards.toyworld import GeneratedImages, WorldOptions, task_images
from shards.vcr import write_vcr_sets

VCR_FIRST_IMAGE = 3_000_000
QUESTIONS_PER_IMAGE = 2
CHOICES = 4


def question_for(objects: list[dict], rng: np.random.Generator, classes: list[str]) -> dict | None:
    """One question record (VCR's fields) about a scene's objects, None for a scene of one
    object or a world with too few classes absent from it."""
    names = {o["name"] for o in objects}
    absent = [c for c in classes if c not in names]
    if len(objects) < 2 or len(absent) < CHOICES - 1:
        return None
    a, b = (int(i) for i in rng.choice(len(objects), 2, replace=False))
    wrong = rng.choice(absent, (2, CHOICES - 1), replace=False)
    answers = [[[a]], *[[str(c)] for c in wrong[0]]]
    reasons = [[[a], "is", "next", "to", [b]], *[[[a], "is", "next", "to", str(c)] for c in wrong[1]]]
    answer_order, reason_order = rng.permutation(CHOICES), rng.permutation(CHOICES)
    return {"question": ["what", "is", "in", "this", "picture", "?"],
            "answer_choices": [["a", *answers[k]] for k in answer_order],
            "rationale_choices": [reasons[k] for k in reason_order],
            "answer_label": int(np.flatnonzero(answer_order == 0)[0]),
            "rationale_label": int(np.flatnonzero(reason_order == 0)[0])}


def write_toy_vcr(out: str | Path, train_images: int, val_images: int, *, seed: int = 0, feature_dim: int = 2048,
                  options: ShardOptions | None = None, world: WorldOptions | None = None) -> dict[str, dict]:
    """Write `out/train` and `out/val` toy VCR shard sets (images of the toy world of `seed`
    with `world`'s options: give the ones of the world the model was pretrained on)."""
    world, options = world or WorldOptions(), options or ShardOptions(samples_per_shard=250)
    rng = np.random.default_rng([seed, 0x7C2])
    splits, images, truth, tight = {"train": [], "val": []}, {}, {}, {}
    for split, record in task_images(seed, feature_dim, world, VCR_FIRST_IMAGE, train_images, val_images, "toy VCR"):
        key, objects = record["image_id"], record["scene"]["objects"]
        images[key] = record
        truth[key] = {"boxes": np.array([o["box"] for o in objects], np.float32), "names": [o["name"] for o in objects]}
        first = [o["regions"][0] for o in objects]  # each object's tight box comes first among its regions
        tight[key] = {**record, "features": record["features"][first], "boxes": truth[key]["boxes"]}
        for _ in range(QUESTIONS_PER_IMAGE):
            question = question_for(objects, rng, world.class_names)
            if question is not None:
                splits[split].append({"image_id": key, "annot_id": f"{split}-{len(splits[split])}", **question})
    return write_vcr_sets(splits, truth.__getitem__, GeneratedImages(images), out, options,
                          gt_source=GeneratedImages(tight), max_regions=max(len(r["boxes"]) for r in images.values()),
                          source_name=f"toyworld seed={seed} {world.describe()} images {VCR_FIRST_IMAGE}+")
