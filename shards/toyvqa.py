"""Toy-world VQA: questions about toy-world scenes, answered by ten simulated people, written
by the same converter as VQA 2.0 (`shards.vqa`).

Question kinds (each question's `question_type`), each balanced so that no answer type is
dominated by one answer:

    existence  "is there a cat?"                       yes/no   (half about absent classes)
    relation   "is the dog to the left of the tree?"   yes/no   (half ask a wrong relation)
    count      "how many objects are there?"           number   (the world's objects per scene)
    colour     "what colour is the car?"               other    (the world's colours)
    size       "is the cup small or large?"            other
    setting    "where is this picture taken?"          other    (park, kitchen, beach, snow)

Of the ten people, most give the canonical answer, some a variant that the VQA evaluation's
normalisation may or may not undo ("grey", "two", "the beach"), and some a wrong answer of
the same kind. The images are new toy-world images (indices from `VQA_FIRST_IMAGE` on), so
they are never among the images a toy-world pretraining saw, as VQA's COCO images are not
in Conceptual Captions.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from shards.build import ShardOptions
from shards.toyworld import SETTINGS, SIZES, GeneratedImages, WorldOptions, relation, task_images
from shards.vqa import write_vqa_sets

VQA_FIRST_IMAGE = 1_000_000
QUESTIONS_PER_IMAGE = 5
RIGHT, VARIANT = 0.8, 0.1  # per person: the canonical answer, a variant; otherwise a wrong answer
RELATIONS = ("to the left of", "to the right of", "above", "below")
VARIANTS = {"gray": ["grey"], "2": ["two"], "3": ["three"], "4": ["four"], "5": ["five"], "6": ["six"],
            "park": ["a park", "the park"], "kitchen": ["a kitchen", "the kitchen"], "beach": ["the beach"],
            "snow": ["in the snow"], "large": ["big"], "yes": ["yes"], "no": ["no"]}
PLACES = [s.split()[-1] for s in SETTINGS]  # "in a park" -> "park"
YES_NO, COUNTS = ["yes", "no"], [str(n) for n in range(1, 8)]


def _people(answer: str, wrong: list[str], rng: np.random.Generator) -> list[str]:
    answers = []
    for _ in range(10):
        draw = rng.random()
        if draw < RIGHT:
            answers.append(answer)
        elif draw < RIGHT + VARIANT:
            answers.append(str(rng.choice(VARIANTS.get(answer, [answer]))))
        else:
            answers.append(str(rng.choice([w for w in wrong if w != answer])))
    return answers


KINDS = ("existence", "relation", "count", "colour", "size", "setting")  # the question_type of each kind


def questions_for(scene: dict, rng: np.random.Generator, world: WorldOptions) -> list[tuple[str, str, str, str,
                                                                                        list[str]]]:
    """(question, answer, answer_type, question_type, wrong answers to draw mistakes from)
    for one scene (`meta["scene"]` form) of a world with `world`'s classes and colours."""
    objects = scene["objects"]
    names = [o["name"] for o in objects]
    unique = [o for o in objects if names.count(o["name"]) == 1]
    asked = []

    def existence():
        present = rng.random() < 0.5
        name = str(rng.choice(names)) if present else str(rng.choice([c for c in world.class_names if c not in names]))
        return f"is there a {name}?", "yes" if present else "no", "yes/no", "existence", YES_NO

    def relation_question():
        if len(unique) < 2:
            return None
        a, b = rng.choice(len(unique), 2, replace=False)
        true = relation(np.array(unique[a]["box"]), np.array(unique[b]["box"]))
        asked_relation = true if rng.random() < 0.5 else str(rng.choice([r for r in RELATIONS if r != true]))
        return (f"is the {unique[a]['name']} {asked_relation} the {unique[b]['name']}?",
                "yes" if asked_relation == true else "no", "yes/no", "relation", YES_NO)

    def count():
        return "how many objects are there?", str(len(objects)), "number", "count", COUNTS

    def colour():
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"what colour is the {o['name']}?", o["colour"], "other", "colour", world.colour_names

    def size():
        if not unique:
            return None
        o = unique[rng.integers(len(unique))]
        return f"is the {o['name']} small or large?", o["size"], "other", "size", SIZES

    def setting():
        return "where is this picture taken?", scene["setting"].split()[-1], "other", "setting", PLACES

    kinds = [existence, relation_question, count, colour, size, setting]
    for k in rng.permutation(len(kinds)):
        question = kinds[k]()
        if question is not None and len(asked) < QUESTIONS_PER_IMAGE:
            asked.append(question)
    return asked


def write_toy_vqa(out: str | Path, train_images: int, val_images: int, *, seed: int = 0, feature_dim: int = 2048,
                  options: ShardOptions | None = None, world: WorldOptions | None = None) -> dict[str, dict]:
    """Write `out/train` and `out/val` toy VQA shard sets (images of the toy world of `seed`
    with `world`'s options: give the ones of the world the model was pretrained on)."""
    world, options = world or WorldOptions(), options or ShardOptions(samples_per_shard=250)
    rng = np.random.default_rng([seed, 0x5A])
    splits, images = {"train": [], "val": []}, {}
    for split, record in task_images(seed, feature_dim, world, VQA_FIRST_IMAGE, train_images, val_images, "toy VQA"):
        images[record["image_id"]] = record
        questions = splits[split]
        for question, answer, answer_type, question_type, wrong in questions_for(record["scene"], rng, world):
            people = _people(answer, wrong, rng)
            questions.append({"question_id": len(questions) + (0 if split == "train" else 10_000_000),
                              "image_id": record["image_id"], "question": question, "answers": people,
                              "answer_type": answer_type, "question_type": question_type,
                              "multiple_choice_answer": Counter(people).most_common(1)[0][0]})
    return write_vqa_sets(splits, GeneratedImages(images), out, options, minival=0,
                          max_regions=max(len(r["boxes"]) for r in images.values()),
                          source_name=f"toyworld seed={seed} {world.describe()} images {VQA_FIRST_IMAGE}+")
