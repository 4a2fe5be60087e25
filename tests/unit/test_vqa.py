"""VQA: the official accuracy, the answer vocabulary and soft targets, and the converter
from the public VQA files to task shards."""

import json

import numpy as np
import pytest

from vilbert.tasks.vqa import (
    build_answer_vocabulary,
    normalise_answer,
    process_digit_article,
    process_punctuation,
    soft_targets,
    vqa_accuracy,
)


# --- the leave-one-out average: min(#other humans matching / 3, 1) over the 10 subsets -------
@pytest.mark.parametrize("humans, expected", [
    (["red"] * 10, 1.0),
    (["red"] * 4 + ["blue"] * 6, 1.0),  # 3 or 4 others match in every subset
    (["red"] * 3 + ["blue"] * 7, 0.9),  # 3 subsets drop a "red": 2 others match (2/3); 7 keep 3 (1)
    (["red"] * 2 + ["blue"] * 8, 0.6),  # (2 x 1/3 + 8 x 2/3) / 10
    (["red"] + ["blue"] * 9, 0.3),  # (1 x 0 + 9 x 1/3) / 10
    (["blue"] * 10, 0.0),
])
def test_leave_one_out_average(humans, expected):
    assert vqa_accuracy(humans, "red") == pytest.approx(expected)


# --- the prediction's normalisation, one rule at a time ----------------------------------
@pytest.mark.parametrize("prediction, normalised", [
    ("Yes", "yes"),  # lower case
    ("yes.", "yes"),  # a period not before a digit goes
    ("3.5", "3.5"),  # a decimal point stays
    ("1,000", "1000"),  # a comma inside a number goes (and so does every other mark)
    ("black/white", "black white"),  # a mark between words becomes a space ...
    ("hi !", "hi"),  # ... and one next to a space goes
    ("two", "2"),  # number words become digits
    ("none", "0"),
    ("the dog", "dog"),  # articles go
    ("a cat", "cat"),
    ("dont", "don't"),  # contractions get their apostrophe
    (" red\tcar\n", "red car"),  # tabs and newlines are spaces; ends stripped
])
def test_prediction_normalisation(prediction, normalised):
    assert process_digit_article(process_punctuation(
        prediction.replace("\n", " ").replace("\t", " ").strip())) == normalised
    assert vqa_accuracy([normalised] * 9 + ["other"], prediction) == 1.0  # answers differ: all normalised
    assert vqa_accuracy([normalised] * 10, prediction, evaluation="2017") == 1.0  # 2017: the prediction always


# --- the two versions of the official script, on the cases where they disagree -------------
@pytest.mark.parametrize("answers, prediction, current, before_2021", [
    (["yes"] * 10, "yes?", 0.0, 1.0),  # ten equal answers: since 2021 nothing is normalised
    (["dog"] * 10, "the dog", 0.0, 1.0),  # ... not even the article
    (["two"] * 10, "two", 1.0, 0.0),  # 2017: the prediction becomes "2", the ten humans stay "two"
    (["two"] * 9 + ["three"], "2", 1.0, 0.0),  # answers differ: since 2021 they are normalised too
    ([" red"] * 10, "red", 1.0, 0.0),  # outer spaces: since 2021 stripped from the answers as well
    (["black/white"] * 10, "black white", 0.0, 0.0),  # both: ten equal answers keep their "/"
    (["black/white"] * 9 + ["gray"], "black white", 1.0, 1.0),  # both: they differ, "/" -> " "
    (["yes!"] * 9 + ["no"], "yes", 1.0, 0.0),  # 2017: "yes!" -> "yes " keeps its space; since 2021 "yes"
])
def test_current_and_2017_official_evaluation(answers, prediction, current, before_2021):
    assert vqa_accuracy(answers, prediction) == pytest.approx(current)  # the default: the current script
    assert vqa_accuracy(answers, prediction, evaluation="2021") == pytest.approx(current)
    assert vqa_accuracy(answers, prediction, evaluation="2017") == pytest.approx(before_2021)


def test_unknown_evaluation_version_is_refused(tmp_path):
    from shards.toyvqa import write_toy_vqa
    from vilbert.data import ShardIndex
    from vilbert.tasks.vqa import VQA, VQAOptions

    with pytest.raises(ValueError, match="2021"):
        vqa_accuracy(["yes"] * 10, "yes", evaluation="2019")
    write_toy_vqa(tmp_path, 8, 4, feature_dim=16)
    with pytest.raises(ValueError, match=r"task.evaluation='2019'"):
        VQA(VQAOptions(evaluation="2019"), ShardIndex.read(tmp_path / "train"))
    # The task scores with the version it is given: ten answers with a leading space match only since 2021.
    records = [({"answers": [" " + VQA(VQAOptions(), ShardIndex.read(tmp_path / "train")).answers[0]] * 10,
                 "answer_type": "other"}, 0)]
    for evaluation, accuracy in (("2021", 1.0), ("2017", 0.0)):
        task = VQA(VQAOptions(evaluation=evaluation), ShardIndex.read(tmp_path / "train"))
        assert task.evaluate(records)["accuracy"] == accuracy


def test_answer_vocabulary_counts_questions_per_normalised_answer():
    annotations = [{"question_id": i, "multiple_choice_answer": a} for i, a in enumerate(
        ["two", "2", "2", "Yes", "yes", "yes", "no", "no", "cat"])]
    assert build_answer_vocabulary(annotations, min_count=2) == ["2", "yes", "no"]  # "two" and "2" are one
    assert build_answer_vocabulary(annotations, min_count=3) == ["2", "yes"]


def test_soft_targets_score_the_human_answer_counts():
    index = {"2": 0, "3": 1, "red": 2, "dog": 3, "yes": 4}
    humans = ["two", "2", "2", "2", "3", "3", "3", "red", "red", "purple"]  # 4 x "2", 3 x "3", 2 x red, 1 x purple
    assert dict(soft_targets(humans, index)) == {0: 1.0, 1: 0.9, 2: 0.6}  # purple is not in the vocabulary
    assert dict(soft_targets(["The dog."] + ["yes"] * 9, index)) == {3: 0.3, 4: 1.0}
    assert normalise_answer("1,000 Dogs!") == "1000 dogs"


# --- the converter --------------------------------------------------------------------------
def _write_vqa_files(directory, rng):
    """VQA v2 style files: train (3 images), val (2 images), test-dev (1 image, no
    annotations), and a folder of per-image .npz features named like COCO files."""
    directory.mkdir(parents=True, exist_ok=True)
    features = directory / "features"
    features.mkdir()
    splits = {"train": [101, 102, 103], "val": [201, 202], "test-dev": [301]}
    answers = ["yes", "no", "2", "red"]
    for split, images in splits.items():
        questions, annotations = [], []
        for image in images:
            n = int(rng.integers(2, 6))
            np.savez(features / f"COCO_{split}2014_{image:012d}.npz", features=rng.random((n, 8), dtype=np.float32),
                     bbox=np.tile([1.0, 2.0, 30.0, 40.0], (n, 1)).astype(np.float32), num_boxes=n, image_w=64,
                     image_h=48)
            for k in range(3):
                qid = image * 1000 + k
                questions.append({"image_id": image, "question": f"question {k} about {image}?", "question_id": qid})
                humans = [str(rng.choice(answers)) for _ in range(10)]
                annotations.append({"question_id": qid, "image_id": image, "question_type": "what",
                                    "answer_type": "other", "multiple_choice_answer": max(humans, key=humans.count),
                                    "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                                                for j, a in enumerate(humans)]})
        (directory / f"{split}_questions.json").write_text(json.dumps({"questions": questions}))
        if split != "test-dev":
            (directory / f"{split}_annotations.json").write_text(json.dumps({"annotations": annotations}))
    return features


def test_converter_writes_the_recipe_splits_with_features_once_per_image(tmp_path):
    from shards.cli import main
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples
    raw = tmp_path / "raw"
    features = _write_vqa_files(raw, np.random.default_rng(0))
    out = tmp_path / "vqa"
    assert main(["vqa", "--questions", f"train={raw}/train_questions.json", f"val={raw}/val_questions.json",
                 f"test-dev={raw}/test-dev_questions.json", "--annotations", f"train={raw}/train_annotations.json",
                 f"val={raw}/val_annotations.json", "--features-dir", str(features), "--out", str(out),
                 "--minival", "2", "--min-answer-count", "1", "--keep-boxes", "1", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["minival", "test-dev", "trainval"]

    seen = {}
    for name in ("trainval", "minival", "test-dev"):
        index = ShardIndex.read(out / name)
        samples = [s for shard in index.shards for _, s, _ in read_checked_samples(str(out / name / shard.name))]
        assert len(samples) == index.num_samples and len({s["key"] for s in samples}) == len(samples)  # once each
        seen[name] = {q["question_id"]: (s["key"], q) for s in samples for q in s["meta"]["questions"]}
        assert index.task["examples"] == len(seen[name]) and index.feature_dim == 8
        assert index.task["answers"] == ShardIndex.read(out / "trainval").task["answers"]  # one vocabulary
        for s in samples:
            assert s["captions"] == [q["question"] for q in s["meta"]["questions"]]
    # minival: the last 2 val questions by id; trainval: train + the other 4 val questions.
    assert sorted(seen["minival"]) == [202001, 202002]
    assert sorted(seen["trainval"]) == sorted([i * 1000 + k for i in (101, 102, 103) for k in range(3)]
                                              + [201000, 201001, 201002, 202000])
    assert sorted(seen["test-dev"]) == [301000, 301001, 301002] and "answers" not in seen["test-dev"][301000][1]
    key, question = seen["trainval"][102001]
    humans = json.loads((raw / "train_annotations.json").read_text())["annotations"][4]
    assert key == "102" and question["answers"] == [a["answer"] for a in humans["answers"]]


def test_pipeline_unpacks_every_question_once(tmp_path):
    """Held-out streams give each question exactly once; training streams unpack questions
    through the shuffle buffer, so a batch mixes images."""
    from shards.toyvqa import write_toy_vqa
    from vilbert.data import DataConfig, ShardIndex, build_loader
    from vilbert.tasks.vqa import VQA, VQAOptions

    write_toy_vqa(tmp_path, 40, 12, feature_dim=16)
    index = ShardIndex.read(tmp_path / "val")
    task = VQA(VQAOptions(), ShardIndex.read(tmp_path / "train"))
    loader, _ = build_loader(DataConfig(shards=str(tmp_path / "val"), batch_size=7, workers=0), train=False,
                             task=task)
    ids = [e["question_id"] for batch in loader for e in batch.examples]
    assert len(ids) == len(set(ids)) == index.task["examples"]
    train, _ = build_loader(DataConfig(shards=str(tmp_path / "train"), batch_size=16, workers=0, shuffle_buffer=100),
                            train=True, task=task)
    batch = next(iter(train))
    assert batch.inputs["region_features"].shape[0] == 16 and batch.targets["scores"].shape == (16, len(task.answers))
    ids = [e["question_id"] for e in batch.examples]
    assert ids != list(range(ids[0], ids[0] + 16))  # not one image's questions after the next's, in order
    assert set(batch.targets["scores"].unique().tolist()) <= {float(np.float32(s)) for s in (0, 0.3, 0.6, 0.9, 1)}


def _convert(raw, features, out, annotations=("train", "val")):
    import subprocess
    import sys

    from helpers import ENV, ROOT

    return subprocess.run([sys.executable, "-m", "shards", "vqa", "--questions", f"train={raw}/train_questions.json",
                           f"val={raw}/val_questions.json", "--features-dir", str(features), "--out", str(out),
                           "--minival", "2", "--min-answer-count", "1", *(
                               ["--annotations", *(f"{s}={raw}/{s}_annotations.json" for s in annotations)]
                               if annotations else [])], capture_output=True, text=True, env=ENV, cwd=ROOT)


@pytest.mark.parametrize("damage, message", [
    (None, "the val questions came without their annotations file"),
    (("questions", "question_id", [1]), "train_questions.json: questions[0]: question_id is '[1]', not an integer"),
    (("annotations", "multiple_choice_answer", 3), "train_annotations.json: annotations[0]: multiple_choice_answer "
                                                   "is '3', not a string"),
    (("questions", "question", 7), "train_questions.json: questions[0]: question is '7', not a string"),
])
def test_converter_inputs_of_the_wrong_type_are_one_line_errors(tmp_path, damage, message):
    raw = tmp_path / "raw"
    features = _write_vqa_files(raw, np.random.default_rng(0))
    if damage is not None:
        kind, field, value = damage
        path = raw / f"train_{kind}.json"
        records = json.loads(path.read_text())
        records[kind][0][field] = value
        path.write_text(json.dumps(records))
    done = _convert(raw, features, tmp_path / "out", annotations=("train",) if damage is None else ("train", "val"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert message in done.stderr.splitlines()[-1], done.stderr[-2000:]


def test_a_bad_question_in_a_task_shard_is_skipped_and_named(tmp_path, caplog):
    from shards.toyvqa import write_toy_vqa
    from shards.writer import ShardSetWriter
    from vilbert.data import DataConfig, ShardIndex, build_loader
    from vilbert.data.sample_codec import encode_sample
    from vilbert.data.tar_reader import read_checked_samples
    from vilbert.tasks.vqa import VQA, VQAOptions

    write_toy_vqa(tmp_path / "toy", 20, 6, feature_dim=16)
    source = ShardIndex.read(tmp_path / "toy/val")
    samples = [s for shard in source.shards for _, s, _ in read_checked_samples(str(tmp_path / "toy/val" / shard.name))]
    broken = {0: ("question", 5), 1: ("answers", "yes"), 2: ("question_id", [3])}
    with ShardSetWriter(tmp_path / "bad", max_samples=100, feature_dim=16, num_classes=0, class_topk=0,
                        max_regions=source.max_regions, source="test", task=source.task) as writer:
        for i, s in enumerate(samples):
            questions = [dict(q) for q in s["meta"]["questions"]]
            if i in broken:
                questions[0][broken[i][0]] = broken[i][1]
            arrays = {"features": s["features"], "boxes": s["boxes"]}
            writer.write(s["key"], encode_sample(s["key"], s["image_id"], [str(q["question"]) for q in questions],
                                                 s["image_w"], s["image_h"], arrays, {"questions": questions}))
    task = VQA(VQAOptions(), ShardIndex.read(tmp_path / "toy/train"))
    loader, _ = build_loader(DataConfig(shards=str(tmp_path / "bad"), batch_size=8, workers=0), train=False,
                                  task=task)
    ids = {e["question_id"] for batch in loader for e in batch.examples}
    assert len(ids) == sum(len(s["meta"]["questions"]) for i, s in enumerate(samples) if i not in broken)
    assert loader.health.totals()["bad"] == 3
    for why in ("the question 5 is not a string", "answers 'yes' are not a list of strings",
                "question_id [3] is not an integer"):
        assert why in caplog.text
