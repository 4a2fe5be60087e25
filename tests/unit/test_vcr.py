"""VCR: object tags as words, the three metrics on hand-worked cases (Q->AR needs both), the
4 choices sharing one image's regions, the loss, and the converter from VCR's files."""

import json

import numpy as np
import pytest
import torch

from helpers import ENV, ROOT
from vilbert.tasks.vcr import CHOICES, NAMES, Q_A, QA_R, VCR, VCROptions, object_words, vcr_text


def test_person_tags_become_one_name_per_question_and_objects_their_class():
    names = ["person", "person", "chair"]
    words = object_words(names, "val-7")
    assert words[0] in NAMES and words[1] in NAMES and words[2] == "chair"
    assert object_words(names, "val-7") == words  # the same draw every epoch, on every rank
    assert len({tuple(object_words(names, f"val-{i}")) for i in range(20)}) > 1  # other questions, other names
    text = vcr_text(["why", "is", [0, 1], "near", [2], "?"], words)
    assert text == f"why is {words[0]} {words[1]} near chair ?"
    with pytest.raises(ValueError, match="points past the image's 3 objects"):
        vcr_text(["who", "is", [3]], words)


def _records(q_a: list[bool], qa_r: list[bool]):
    """Records of questions whose Q->A / QA->R argmax is right or not (label 1)."""
    out = []
    for i, (a, r) in enumerate(zip(q_a, qa_r)):
        out.append(({"annot_id": f"q{i}", "kind": Q_A, "given": None, "label": 1}, [0, 2, 1, 0] if a else [3, 2, 1, 0]))
        out.append(({"annot_id": f"q{i}", "kind": QA_R, "given": 1, "label": 1}, [0, 5, 1, 0] if r else [0, 1, 5, 0]))
    return out


def _task(tmp_path):
    from shards.toyvcr import write_toy_vcr
    from vilbert.data import ShardIndex

    write_toy_vcr(tmp_path, 12, 4, feature_dim=16)
    return VCR(VCROptions(), ShardIndex.read(tmp_path / "train"))


def test_q_ar_counts_a_question_only_when_both_are_right(tmp_path):
    task = _task(tmp_path)
    metrics = task.evaluate(_records([True, True, False, False], [True, False, True, False]))
    assert metrics == {"q_a": 0.5, "qa_r": 0.5, "q_ar": 0.25, "questions": 4.0}
    assert task.evaluate(_records([True, True, True], [True, True, False]))["q_ar"] == pytest.approx(2 / 3)
    unlabelled = [({"annot_id": "t", "kind": Q_A, "given": None, "label": -1}, [1, 0, 0, 0])]
    assert task.evaluate(unlabelled) == {}


def test_four_choices_share_one_image_row_until_the_device(tmp_path):
    """The batch holds each image's regions once; `model_inputs` repeats them per choice, text
    row i meeting image row i // 4; the second segment has token type 1."""
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples
    from vilbert.modeling.outputs import ViLBERTTaskOutput

    task = _task(tmp_path)
    index = ShardIndex.read(tmp_path / "train")
    sample = next(s for shard in index.shards for _, s, _ in read_checked_samples(str(tmp_path / "train" / shard.name)))
    examples = task.examples(sample)
    assert [e["kind"] for e in examples] == [Q_A, QA_R] * len(sample["meta"]["questions"])
    assert all(e["features"] is examples[0]["features"] for e in examples)
    batch = task.collate(examples)
    b = len(examples)
    assert batch.region_rows.tolist() == [i // CHOICES for i in range(b * CHOICES)]
    assert batch.inputs["region_features"].shape[0] == b
    assert batch.inputs["input_ids"].shape[0] == b * CHOICES
    inputs = batch.model_inputs()
    assert inputs["region_features"].shape[0] == b * CHOICES
    assert torch.equal(inputs["region_features"][5], batch.inputs["region_features"][1].float())
    from vilbert.data.tokenizer import load_tokenizer
    from vilbert.tasks.vcr import object_words

    tokenizer, questions = load_tokenizer(None), sample["meta"]["questions"]
    for i in range(len(examples)):  # the labelled row ends with the right answer / rationale
        q = questions[i // 2]
        words = object_words(sample["meta"]["names"], q["annot_id"])
        right = q["answer_choices"][q["answer_label"]] if i % 2 == 0 else q["rationale_choices"][q["rationale_label"]]
        row = i * CHOICES + int(batch.targets["labels"][i])
        text = tokenizer.decode(batch.inputs["input_ids"][row][batch.inputs["attention_mask"][row].bool()])
        assert text.endswith(f"{vcr_text(right, words)} [SEP]")
    types = batch.inputs["token_type_ids"][0][batch.inputs["attention_mask"][0].bool()]
    assert types[0] == 0 and types[-1] == 1 and set(types.tolist()) == {0, 1}

    scores = torch.randn(b * CHOICES, requires_grad=True)
    loss, accuracy = task.loss_and_metric(ViLBERTTaskOutput(pair_logits=scores), batch)
    expected = torch.nn.functional.cross_entropy(scores.view(b, CHOICES), batch.targets["labels"])
    assert loss.item() == pytest.approx(expected.item()) and 0 <= accuracy.item() <= 1
    assert task.predict(ViLBERTTaskOutput(pair_logits=scores), batch).shape == (b, CHOICES)


def test_ground_truth_regions_are_kept_and_the_detector_regions_cut_to_make_room(tmp_path):
    task = _task(tmp_path)
    task.options.max_regions = 5
    sample = {"features": np.arange(8, dtype=np.float32)[:, None].repeat(2, 1), "boxes": np.zeros((8, 4), np.float32),
              "image_w": 10, "image_h": 10, "meta": {"gt_regions": 3}}
    kept = task._regions(sample)
    assert kept["features"][:, 0].tolist() == [0, 1, 5, 6, 7]  # 2 of the detector's, all 3 ground-truth boxes


# --- the converter ---------------------------------------------------------------------------
def _write_vcr_files(directory, rng):
    """train.jsonl (2 images, 3 questions), test.jsonl (1 image, no labels), metadata JSON,
    per-image detector features and features at the metadata boxes, keyed by img_id."""
    for folder in ("features", "gt", "images/movie"):
        (directory / folder).mkdir(parents=True)
    splits = {"train": {"train-1": 2, "train-2": 1}, "test": {"test-5": 1}}
    for split, images in splits.items():
        lines = []
        for img_id, questions in images.items():
            names = ["person", "person", "dog"]
            boxes = [[1, 2, 30, 40, 0.9], [5, 5, 20, 20, 0.8], [40, 10, 60, 30, 0.7]]
            (directory / "images/movie" / f"{img_id}.json").write_text(json.dumps(
                {"boxes": boxes, "names": names, "width": 64, "height": 48, "segms": []}))
            n = int(rng.integers(3, 6))
            np.savez(directory / "features" / f"{img_id}.npz", features=rng.random((n, 8), dtype=np.float32),
                     bbox=np.tile([1.0, 2.0, 30.0, 40.0], (n, 1)).astype(np.float32), num_boxes=n, image_w=64,
                     image_h=48)
            np.savez(directory / "gt" / f"{img_id}.npz", features=rng.random((3, 8), dtype=np.float32),
                     bbox=np.array(boxes, np.float32)[:, :4], num_boxes=3, image_w=64, image_h=48)
            for k in range(questions):
                record = {"img_id": img_id, "metadata_fn": f"movie/{img_id}.json", "annot_id": f"{img_id}-q{k}",
                          "objects": names, "question": ["what", "is", [0], "doing", "?"],
                          "answer_choices": [[[0], "is", w] for w in ("running", "eating", "sleeping", "reading")],
                          "rationale_choices": [[[0], "holds", [2], r] for r in ("a", "b", "c", "d")]}
                if split != "test":
                    record.update(answer_label=k % 4, rationale_label=(k + 1) % 4)
                lines.append(json.dumps(record))
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")


def test_converter_writes_questions_once_per_image_with_ground_truth_regions_last(tmp_path):
    from shards.cli import main
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples

    raw, out = tmp_path / "raw", tmp_path / "vcr"
    _write_vcr_files(raw, np.random.default_rng(0))
    assert main(["vcr", "--annotations", f"train={raw}/train.jsonl", f"test={raw}/test.jsonl", "--images-dir",
                 str(raw / "images"), "--features-dir", str(raw / "features"), "--gt-features-dir", str(raw / "gt"),
                 "--out", str(out), "--keep-boxes", "1", "100"]) == 0
    train, test = ShardIndex.read(out / "train"), ShardIndex.read(out / "test")
    assert train.task["examples"] == 3 * 2 and test.task["examples"] == 1 * 5  # Q->A + QA->R; + given each answer
    samples = {s["key"]: s for split in ("train", "test") for shard in ShardIndex.read(out / split).shards
               for _, s, _ in read_checked_samples(str(out / split / shard.name))}
    assert sorted(samples) == ["test-5", "train-1", "train-2"]
    sample = samples["train-1"]
    detector = np.load(raw / "features" / "train-1.npz")
    assert sample["meta"]["gt_regions"] == 3 and sample["meta"]["names"] == ["person", "person", "dog"]
    assert len(sample["boxes"]) == int(detector["num_boxes"]) + 3
    assert sample["boxes"][-1].tolist() == [40, 10, 60, 30]  # the metadata boxes come last, in order
    assert [q["annot_id"] for q in sample["meta"]["questions"]] == ["train-1-q0", "train-1-q1"]
    assert sample["meta"]["questions"][1]["answer_label"] == 1

    task = VCR(VCROptions(), train)
    examples = task.examples(samples["test-5"])
    assert [(e["kind"], e["given"]) for e in examples] == [(Q_A, None)] + [(QA_R, a) for a in range(4)]
    records = [(e, [0.0, 1.0, 0.0, 0.0]) for e in examples]
    (result,) = task.results(records)
    assert result["annot_id"] == "test-5-q0" and sorted(result["rationale_probs"]) == ["0", "1", "2", "3"]
    assert sum(result["answer_probs"]) == pytest.approx(1.0)


def test_converter_names_a_bad_annotation_line(tmp_path):
    import subprocess
    import sys

    raw = tmp_path / "raw"
    _write_vcr_files(raw, np.random.default_rng(0))
    lines = (raw / "train.jsonl").read_text().splitlines()
    broken = json.loads(lines[1])
    del broken["rationale_label"]
    (raw / "train.jsonl").write_text("\n".join([lines[0], json.dumps(broken)]) + "\n")
    done = subprocess.run([sys.executable, "-m", "shards", "vcr", "--annotations", f"train={raw}/train.jsonl",
                           "--images-dir", str(raw / "images"), "--features-dir", str(raw / "features"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train.jsonl:2: has only one of answer_label and rationale_label" in done.stderr.splitlines()[-1]
