"""The toy world: determinism, what each option promises, and toy VQA from the same world."""

import re

import numpy as np
import pytest

from shards.cli import main as shards_main
from shards.toyvqa import questions_for
from shards.toyworld import CLASSES, COLOURS, MAX_REGIONS, SETTINGS, ToyWorld, WorldOptions, write_toyworld
from vilbert.data.shard_index import ShardIndex

SMALL = WorldOptions(classes=6, colours=4, objects=(1, 3), boxes_per_object=(1, 2), background_boxes=(0, 2),
                     min_regions=3, noise=0.2, setting_mention=0.0)


def test_toy_world_is_deterministic_by_seed_and_options(tmp_path):
    for name, seed, world in (("a", 1, None), ("b", 1, None), ("c", 2, None), ("d", 1, SMALL), ("e", 1, SMALL)):
        write_toyworld(tmp_path / name, 300, 50, seed=seed, feature_dim=32, world=world)

    def shard(name, split="train"):
        return (tmp_path / name / split / "shard-000000.tar").read_bytes()

    assert shard("a") == shard("b") and shard("a", "val") == shard("b", "val") and shard("d") == shard("e")
    assert shard("a") != shard("c") and shard("a") != shard("d")
    index = ShardIndex.read(tmp_path / "d/train")
    assert index.num_classes == 7 and index.class_names == ["background", *CLASSES[:6]]
    assert "classes=6" in index.source and "setting_mention=0.0" in index.source


def test_default_world_scenes_captions_and_regions():
    world = ToyWorld(seed=0, feature_dim=64)
    options = world.options
    records = list(world.generate(0, 200))
    for r in records:
        n = len(r["boxes"])
        assert options.min_regions <= n <= MAX_REGIONS and r["features"].shape == (n, 64)
        assert (r["features"] >= 0).all()
        assert np.allclose(r["cls_prob"].sum(1), 1, atol=1e-5) and r["cls_prob"].shape[1] == options.classes + 1
        names = {o["name"] for o in r["scene"]["objects"]}
        for caption in r["captions"]:
            assert any(name in caption for name in names), caption  # captions talk about the scene
        for o in r["scene"]["objects"]:
            tight = r["boxes"][o["regions"][0]]
            assert np.allclose(tight, np.clip(o["box"], 0, None), atol=1.0)  # the first region is the object
    # The pretend detector names the class of a tight box most of the time, not always.
    detector_accuracy = np.mean([r["cls_prob"][o["regions"][0]].argmax() - 1 == CLASSES.index(o["name"])
                                 for r in records for o in r["scene"]["objects"]])
    assert 0.8 < detector_accuracy < 1.0, detector_accuracy
    # The setting shows in the image as a whole: the mean region feature (what the IMG token
    # starts from) of a held-out image is nearest to the mean of its own setting's images.
    image_means = np.stack([r["features"].astype(np.float32).mean(0) for r in records])
    settings = np.array([SETTINGS.index(r["scene"]["setting"]) for r in records])
    centroids = np.stack([image_means[:100][settings[:100] == k].mean(0) for k in range(len(SETTINGS))])
    nearest = np.linalg.norm(image_means[100:, None] - centroids[None], axis=-1).argmin(1)
    assert np.mean(nearest == settings[100:]) > 0.9


def _words(records):
    return {w for r in records for c in r["captions"] for w in re.findall(r"[a-z]+", c)}


def test_options_hold_what_they_promise():
    records = list(ToyWorld(seed=5, feature_dim=16, options=SMALL).generate(0, 400))
    objects = [o for r in records for o in r["scene"]["objects"]]
    assert {o["name"] for o in objects} == set(CLASSES[:6]) and {o["colour"] for o in objects} == set(COLOURS[:4])
    words = _words(records) - set(COLOURS[:4])  # "orange" is a colour and a class
    assert words.isdisjoint(CLASSES[6:]) and words.isdisjoint(COLOURS[4:])
    assert words.isdisjoint({"park", "kitchen", "beach", "snow"})  # setting_mention=0: never named
    assert {len(r["scene"]["objects"]) for r in records} == {1, 2, 3}
    for r in records:
        per_object = [len(o["regions"]) for o in r["scene"]["objects"]]
        assert all(1 <= k <= 2 for k in per_object)
        assert max(SMALL.min_regions, sum(per_object)) <= len(r["boxes"]) <= max(SMALL.min_regions,
                                                                                   sum(per_object) + 2)
    always = list(ToyWorld(seed=5, feature_dim=16, options=WorldOptions(setting_mention=1.0)).generate(0, 50))
    assert all(c.endswith(f" {r['scene']['setting']}.") for r in always for c in r["captions"])
    # Less noise, features closer to the noiseless ones: the same scenes, other noise.
    quiet = ToyWorld(seed=5, feature_dim=16, options=WorldOptions(noise=0.0))
    loud = ToyWorld(seed=5, feature_dim=16, options=WorldOptions(noise=2.0))
    spread = [np.std(np.concatenate([r["features"] for r in w.generate(0, 50)]).astype(np.float32))
              for w in (quiet, loud)]
    assert spread[0] < spread[1]


def test_a_colour_aware_detector_puts_its_confidence_on_the_colour_object_pair():
    world = ToyWorld(seed=5, feature_dim=16, options=WorldOptions(classes=6, colours=4, detector_colours=True))
    assert world.num_classes == 1 + 6 * 4 and world.class_names[1:3] == ["red dog", "orange dog"]
    records = list(world.generate(0, 100))
    hits = []
    for r in records:
        for o in r["scene"]["objects"]:
            tight = o["regions"][0]  # coverage 1: the detector's best look
            hits.append(world.class_names[int(np.argmax(r["cls_prob"][tight]))] == f"{o['colour']} {o['name']}")
    assert np.mean(hits) > 0.6  # the pair itself, unless a look-alike class of the same colour wins
    plain = ToyWorld(seed=5, feature_dim=16, options=WorldOptions(classes=6, colours=4))
    assert plain.num_classes == 7 and next(plain.generate(0, 1))["cls_prob"].shape[1] == 7


def test_toy_vqa_asks_about_the_worlds_classes_and_colours():
    records = list(ToyWorld(seed=5, feature_dim=16, options=SMALL).generate(0, 300))
    rng = np.random.default_rng(0)
    asked = [q for r in records for q in questions_for(r["scene"], rng, SMALL)]
    colours = {answer for question, answer, *_ in asked if question.startswith("what colour")}
    absent = {question.split()[-1].rstrip("?") for question, answer, *_ in asked
              if question.startswith("is there") and answer == "no"}
    assert colours == set(COLOURS[:4]) and absent <= set(CLASSES[:6]) and absent


def test_options_are_checked_and_given_on_the_command_line(tmp_path):
    with pytest.raises(ValueError, match="classes=99"):
        WorldOptions(classes=99)
    with pytest.raises(ValueError, match="objects"):
        WorldOptions(objects=(3, 2))
    assert shards_main(["toyworld", "--out", str(tmp_path / "w"), "--images", "60", "--val-images", "0",
                        "--feature-dim", "8", "--workers", "1", "--classes", "5", "--objects", "1-2",
                        "--setting-mention", "0"]) == 0
    index = ShardIndex.read(tmp_path / "w/train")
    assert index.num_classes == 6 and "objects=(1, 2)" in index.source
    with pytest.raises(SystemExit):
        shards_main(["toyworld", "--out", str(tmp_path / "x"), "--objects", "two"])
