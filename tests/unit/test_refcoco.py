"""Referring expressions: the IoU and the metric on hand-worked cases, the loss and the head's
shape, the pickle reader that runs nothing, the converter from the refer toolkit's files,
and the toy expressions."""

import json
import pickle

import numpy as np
import pytest
import torch

from helpers import ENV, ROOT
from vilbert.tasks.refcoco import HIT_IOU, RefCOCO, RefCOCOOptions, box_iou


# --- IoU, as the official code counts pixels (inclusive boxes: width = x2 - x1 + 1) ---------
@pytest.mark.parametrize("box, expected", [
    ([0, 0, 9, 9], 1.0),  # itself
    ([0, 0, 19, 9], 0.5),  # twice as wide: 100 / 200, exactly the threshold
    ([0, 0, 20, 9], 100 / 210),  # one pixel more: just below it
    ([5, 0, 14, 9], 50 / 150),  # half overlapping
    ([10, 10, 19, 19], 0.0),  # touching corners do not overlap
])
def test_iou_counts_pixels_inclusively(box, expected):
    assert box_iou(np.array([box]), [0, 0, 9, 9])[0] == pytest.approx(expected, abs=1e-12)


def _task(tmp_path):
    from shards.toyrefcoco import write_toy_refcoco
    from vilbert.data import ShardIndex

    write_toy_refcoco(tmp_path, 12, 4, feature_dim=16)
    return RefCOCO(RefCOCOOptions(), ShardIndex.read(tmp_path / "train"))


def test_accuracy_counts_the_chosen_region_at_the_threshold_edge(tmp_path):
    """A hit is IoU >= 0.5 (exactly 0.5 counts, just below does not); the IMG token is never
    chosen."""
    task = _task(tmp_path)
    referred = [0, 0, 9, 9]
    boxes = np.array([[0, 0, 19, 9], [0, 0, 20, 9], [50, 50, 60, 60]], np.float32)
    example = {"ious": box_iou(boxes, referred).tolist()}
    assert task.evaluate([(example, 0)]) == {"accuracy": 1.0, "expressions": 1.0}  # IoU exactly 0.5
    assert task.evaluate([(example, 1)])["accuracy"] == 0.0  # IoU 0.476
    assert task.evaluate([(example, 0), (example, 1), (example, 2), (example, 0)])["accuracy"] == 0.5
    assert task.evaluate([]) == {}


def test_examples_collate_loss_and_prediction_shapes(tmp_path):
    """One example per expression sharing the image's arrays; targets are the IoUs with those
    below 0.5 set to 0; the loss is the mean BCE times the region slots; the prediction is
    a region index (the IMG token, slot 0, is none)."""
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples
    from vilbert.modeling.outputs import ViLBERTTaskOutput

    task = _task(tmp_path)
    index = ShardIndex.read(tmp_path / "train")
    sample = next(s for shard in index.shards for _, s, _ in read_checked_samples(str(tmp_path / "train" / shard.name))
                  if len(s["meta"]["refs"]) >= 2)
    examples = task.examples(sample)
    assert len(examples) == len(sample["meta"]["refs"]) and examples[0]["features"] is examples[1]["features"]
    batch = task.collate(examples)
    regions = len(sample["boxes"])
    assert batch.inputs["region_features"].shape[:2] == (len(examples), regions + 1)
    assert batch.targets["ious"].shape == (len(examples), regions + 1) and (batch.targets["ious"][:, 0] == 0).all()
    ious = batch.targets["ious"]
    for i, ref in enumerate(sample["meta"]["refs"]):
        assert ious[i, 1:].numpy() == pytest.approx(box_iou(sample["boxes"], ref["box"]), abs=1e-6)

    logits = torch.full(ious.shape, -5.0, requires_grad=True)
    best = ious[:, 1:].argmax(1)
    with torch.no_grad():
        logits[:, 0] = 9.0  # the IMG token scores highest, and is still not chosen
        logits[torch.arange(len(best)), best + 1] = 5.0
    out = ViLBERTTaskOutput(region_logits=logits)
    loss, accuracy = task.loss_and_metric(out, batch)
    targets = torch.where(ious >= HIT_IOU, ious, torch.zeros_like(ious))
    by_hand = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(examples)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)  # mean x slots = sum over slots, per example
    assert accuracy.item() == 1.0 and task.predict(out, batch).tolist() == best.tolist()
    loss.backward()
    assert logits.grad.shape == ious.shape


# --- the pickle reader: plain containers only, nothing run ---------------------------------
def test_plain_pickles_are_read_python2_strings_as_text(tmp_path):
    from shards.refcoco import read_pickle

    refs = [{"ref_id": 1, "sentences": [{"raw": "the man", "sent_id": 7}], "split": "testA", "box": (1.0, 2.5)}]
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"refs{protocol}.p"
        path.write_bytes(pickle.dumps(refs, protocol=protocol))
        assert read_pickle(path) == refs
    # Python 2's cPickle wrote byte strings (SHORT_BINSTRING): they come back as text.
    py2 = b"\x80\x02]q\x00}q\x01U\x03rawq\x02U\x07the manq\x03sa."
    (tmp_path / "py2.p").write_bytes(py2)
    assert read_pickle(tmp_path / "py2.p") == [{"raw": "the man"}]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("make", [
    lambda marker: pickle.dumps([{"ref_id": 1}, _Payload(marker)], protocol=2),
    lambda marker: pickle.dumps({"refs": _Payload(marker)}, protocol=0),  # the text protocol's GLOBAL
    lambda marker: pickle.dumps(_Payload(marker), protocol=pickle.HIGHEST_PROTOCOL),  # STACK_GLOBAL
    lambda marker: pickle.dumps({1, 2}, protocol=2),  # a set: builtins.set is a global too
])
def test_a_pickle_that_names_any_callable_is_refused_and_runs_nothing(tmp_path, make):
    from shards.refcoco import read_pickle
    from shards.sources import InputError

    marker = tmp_path / "ran"
    path = tmp_path / "refs(unc).p"
    path.write_bytes(make(marker))
    with pytest.raises(InputError, match=r"refused \(it names "):
        read_pickle(path)
    assert not marker.exists()


def test_damaged_pickles_are_one_line_errors(tmp_path):
    from shards.refcoco import read_pickle
    from shards.sources import InputError

    path = tmp_path / "refs.p"
    path.write_bytes(pickle.dumps([{"a": 1}], protocol=2)[:-5])
    with pytest.raises(InputError, match="not a readable pickle"):
        read_pickle(path)


# --- the converter ----------------------------------------------------------------------------
def _write_refer_files(directory, rng, gt: bool = True):
    """refs(unc).p (protocol 2, as the toolkit's), instances.json, per-image .npz detector
    features, and (train) features at the ground-truth boxes."""
    (directory / "features").mkdir(parents=True)
    (directory / "gt").mkdir()
    images = {11: "train", 12: "train", 21: "val", 31: "testA", 41: "testB"}
    refs, annotations = [], []
    for image, split in images.items():
        n = int(rng.integers(3, 6))
        boxes = np.array([[10 * k, 5, 10 * k + 30, 40] for k in range(n)], np.float32)
        np.savez(directory / "features" / f"COCO_train2014_{image:012d}.npz", features=rng.random((n, 8), np.float32),
                 bbox=boxes, num_boxes=n, image_w=100, image_h=80)
        objects = [[2.0 * k, 3.0, 20.0, 30.0] for k in range(2)]  # COCO x, y, width, height
        if gt:
            np.savez(directory / "gt" / f"{image}.npz", features=rng.random((2, 8), np.float32),
                     bbox=np.array([[x, y, x + w, y + h] for x, y, w, h in objects], np.float32), num_boxes=2,
                     image_w=100, image_h=80)
        for k, bbox in enumerate(objects):
            ann = image * 10 + k
            annotations.append({"id": ann, "image_id": image, "bbox": bbox, "category_id": 1})
            refs.append({"ref_id": ann, "ann_id": ann, "image_id": image, "split": split, "category_id": 1,
                         "sent_ids": [ann * 10, ann * 10 + 1],
                         "sentences": [{"raw": f"Object {k} of {image}", "sent": f"object {k} of {image}",
                                        "sent_id": ann * 10 + s, "tokens": []} for s in range(2)]})
    (directory / "refs(unc).p").write_bytes(pickle.dumps(refs, protocol=2))
    (directory / "instances.json").write_text(json.dumps({"annotations": annotations, "images": []}))
    return refs


def test_converter_writes_each_split_and_adds_ground_truth_boxes_to_train_only(tmp_path):
    from shards.cli import main
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples

    raw, out = tmp_path / "raw", tmp_path / "refcoco+"
    refs = _write_refer_files(raw, np.random.default_rng(0))
    assert main(["refcoco", "--refs", str(raw / "refs(unc).p"), "--instances", str(raw / "instances.json"),
                 "--features-dir", str(raw / "features"), "--gt-features-dir", str(raw / "gt"), "--out", str(out),
                 "--keep-boxes", "1", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["testA", "testB", "train", "val"]
    expected = {r["sentences"][s]["sent_id"]: (r, s) for r in refs for s in range(2)}
    seen = set()
    for split in ("train", "val", "testA", "testB"):
        index = ShardIndex.read(out / split)
        assert index.task["name"] == "refcoco" and index.task["ground_truth_boxes"] == (split == "train")
        samples = [s for shard in index.shards for _, s, _ in read_checked_samples(str(out / split / shard.name))]
        assert index.task["examples"] == sum(len(s["meta"]["refs"]) for s in samples)
        for sample in samples:
            detector = np.load(raw / "features" / f"COCO_train2014_{int(sample['key']):012d}.npz")
            assert len(sample["boxes"]) == int(detector["num_boxes"]) + (2 if split == "train" else 0)
            for ref in sample["meta"]["refs"]:
                source, s = expected[ref["sent_id"]]
                assert source["split"] == split and ref["expression"] == source["sentences"][s]["raw"]
                x, y, w, h = 2.0 * (source["ann_id"] % 10), 3.0, 20.0, 30.0
                assert ref["box"] == [x, y, x + w, y + h]
                seen.add(ref["sent_id"])
    assert seen == set(expected)  # every sentence once


def test_converter_refuses_a_malicious_refs_file_and_a_mismatched_instances_file(tmp_path):
    import subprocess
    import sys

    raw = tmp_path / "raw"
    _write_refer_files(raw, np.random.default_rng(0), gt=False)
    command = [sys.executable, "-m", "shards", "refcoco", "--refs", str(raw / "refs(unc).p"), "--instances",
               str(raw / "instances.json"), "--features-dir", str(raw / "features"), "--out", str(tmp_path / "o")]
    (raw / "refs(unc).p").write_bytes(pickle.dumps([_Payload(tmp_path / "ran")], protocol=2))
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.returncode == 1 and "refused (it names posix.system" in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "ran").exists() and not (tmp_path / "o").exists()

    _write_refer_files(tmp_path / "raw2", np.random.default_rng(0), gt=False)
    (raw / "refs(unc).p").write_bytes((tmp_path / "raw2" / "refs(unc).p").read_bytes())
    (raw / "instances.json").write_text(json.dumps({"annotations": []}))
    done = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.returncode == 1 and "is not in" in done.stderr.splitlines()[-1], done.stderr[-2000:]


# --- toy expressions --------------------------------------------------------------------------
def test_toy_expressions_fit_their_object_and_no_other():
    from shards.toyrefcoco import expression_for

    dog = {"name": "dog", "colour": "red", "size": "small", "box": [0, 0, 10, 10]}
    rng = np.random.default_rng(0)
    for _ in range(20):  # another dog of another colour: the colour is always named
        assert "blue dog" in expression_for([{**dog, "colour": "blue"}, dog, {**dog, "name": "car"}], 0, rng)
    twin = {**dog, "box": [100, 0, 110, 10]}
    car = {"name": "car", "colour": "red", "size": "large", "box": [50, 0, 60, 10]}
    for _ in range(20):  # identical twins: only where they are tells them apart
        assert expression_for([dog, twin, car], 0, rng) == "the small red dog to the left of the car"
        assert expression_for([dog, twin, car], 1, rng) == "the small red dog to the right of the car"
    assert expression_for([dog, twin], 0, rng) is None  # nothing tells them apart
