"""Image retrieval: R@K and the median rank with ties on hand-worked cases, every (caption,
image) pair scored exactly once (also over 2 ranks), the 4-way training choices and their
shapes and loss, hard negatives, reading samples by key, zero-shot scoring, and the
converter from Karpathy's dataset JSON."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vilbert.tasks.base import TaskBatch
from vilbert.tasks.retrieval import (
    CHOICES,
    HARD_NEGATIVES,
    Retrieval,
    RetrievalOptions,
    TrainingChoices,
    read_hard_negatives,
    retrieval_metrics,
)


# --- the metrics ------------------------------------------------------------------------------
def test_recall_and_median_rank_count_ties_as_the_average_over_their_orders():
    scores = np.zeros((3, 12))
    scores[0] = np.arange(12)[::-1]  # caption 0: its image (0) alone at the top: rank 1
    scores[1, [0, 1]] = 5  # caption 1: tied with one other at the top: rank 1 or 2
    scores[2, 0] = 3  # caption 2: four images above, one tied: rank 5 or 6
    scores[2, 1:5], scores[2, 5] = 4, 3
    metrics = retrieval_metrics(scores, np.array([0, 0, 0]))
    assert metrics["r1"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert metrics["r5"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert metrics["r10"] == 1.0
    assert metrics["median_rank"] == 1.5  # of 1, 1.5 and 5.5
    assert (metrics["captions"], metrics["images"]) == (3, 12)


def test_a_scorer_that_ties_everything_gets_exactly_chance():
    metrics = retrieval_metrics(np.ones((40, 20)), np.arange(40) % 20)
    assert (metrics["r1"], metrics["r5"], metrics["r10"]) == pytest.approx((1 / 20, 5 / 20, 10 / 20))
    assert metrics["median_rank"] == 10.5


# --- toy shards, the task, the store ---------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from shards.build import ShardOptions
    from shards.toyretrieval import write_toy_retrieval

    out = tmp_path_factory.mktemp("toyretrieval")
    write_toy_retrieval(out, 24, 10, feature_dim=16, options=ShardOptions(samples_per_shard=3))  # val: 4 shards
    return out


def _task(toy, **options):
    from vilbert.data import ShardIndex

    return Retrieval(RetrievalOptions(**{"eval_chunk": 7, **options}), ShardIndex.read(toy / "train"))


def _samples(directory):
    from vilbert.data.shard_index import ShardIndex
    from vilbert.data.tar_reader import read_checked_samples

    index = ShardIndex.read(directory)
    return [s for shard in index.shards for _, s, _ in read_checked_samples(str(directory / shard.name))]


def test_the_store_reads_any_sample_by_key_as_the_stream_does(toy):
    from vilbert.data.sample_store import SampleStore

    samples, store = _samples(toy / "train"), SampleStore(toy / "train")
    assert store.keys == [s["key"] for s in samples] and store.captions == [s["captions"] for s in samples]
    for sample in samples[::-5]:
        loaded = store.load(sample["key"])
        assert np.array_equal(loaded["features"], sample["features"]) and loaded["meta"] == sample["meta"]
    with pytest.raises(ValueError, match="local shard-set directory"):
        SampleStore("pipe:cat " + str(toy / "train" / "shard-000000.tar"))


def _pairs(task, toy, rank=0, world_size=1):
    """(caption number, image key) of every pair the evaluation stream of `rank` scores."""
    from vilbert.data import build_loader
    from vilbert.data.config import DataConfig

    loader, _ = build_loader(DataConfig(shards=str(toy / "val"), batch_size=3), train=False, rank=rank,
                             world_size=world_size, task=task)
    pairs = []
    for batch in loader:
        assert batch.inputs["region_features"].shape[0] == len(batch)  # each image once per example
        assert batch.inputs["input_ids"].shape[0] == len(batch) * task.options.eval_chunk
        pairs += [(e["start"] + i, e["image"]) for e in batch.examples for i in range(e["n"])]
    return pairs


@pytest.mark.parametrize("max_images", [0, 4])
def test_evaluation_scores_every_pair_exactly_once_also_over_two_ranks(toy, max_images):
    task = _task(toy, max_images=max_images)
    samples = _samples(toy / "val")[:max_images or None]
    captions = sum(len(s["captions"]) for s in samples)
    expected = sorted((c, s["key"]) for c in range(captions) for s in samples)
    one_rank = _pairs(task, toy)
    two_ranks = _pairs(task, toy, 0, 2) + _pairs(task, toy, 1, 2)
    assert sorted(one_rank) == expected and sorted(two_ranks) == expected  # each once, none missing
    assert _pairs(task, toy, 0, 2) and _pairs(task, toy, 1, 2)  # both ranks had a share


def _records(task, toy, score):
    """Evaluation records of the val split with `score(caption number, image key)` as the model."""
    from vilbert.data import build_loader
    from vilbert.data.config import DataConfig

    loader, _ = build_loader(DataConfig(shards=str(toy / "val"), batch_size=4), train=False, task=task)
    chunk = task.options.eval_chunk
    return [(e, [score(e["start"] + i, e["image"]) if i < e["n"] else 0.0 for i in range(chunk)])
            for batch in loader for e in batch.examples]


def test_evaluate_finds_each_captions_image_and_refuses_pairs_scored_twice_or_not_at_all(toy):
    task = _task(toy)
    samples = _samples(toy / "val")
    owner = [s["key"] for s in samples for _ in s["captions"]]
    perfect = task.evaluate(_records(task, toy, lambda c, image: float(owner[c] == image)))
    assert (perfect["r1"], perfect["median_rank"], perfect["images"]) == (1.0, 1.0, len(samples))
    backwards = task.evaluate(_records(task, toy, lambda c, image: -float(owner[c] == image)))
    assert backwards["r5"] == 0 and backwards["median_rank"] == len(samples)  # last of the 10
    records = _records(task, toy, lambda c, image: 0.0)
    with pytest.raises(ValueError, match="every \\(caption, image\\) pair must be scored once"):
        task.evaluate(records + records[:1])
    with pytest.raises(ValueError, match="every \\(caption, image\\) pair must be scored once"):
        task.evaluate(records[1:])
    results = task.results(_records(task, toy, lambda c, image: float(owner[c] == image)))
    assert [r["image"] for r in results] == owner and all(r["top10"][0] == r["image"] for r in results)


# --- training ---------------------------------------------------------------------------------
def test_training_choices_are_the_pair_a_random_caption_a_random_image_and_a_hard_negative(toy):
    from vilbert.data.sample_store import SampleStore

    store = SampleStore(toy / "train")
    hard = read_hard_negatives(toy / "train", store.keys)
    sample = _samples(toy / "train")[0]
    examples = TrainingChoices(store, hard)(sample)
    assert len(examples) == len(sample["captions"])
    for caption, e in zip(sample["captions"], examples):
        assert e["texts"][0] == e["texts"][2] == e["texts"][3] == caption and e["rows"] == [0, 0, 1, 2]
        assert e["texts"][1] not in sample["captions"]  # a caption of another image
        assert e["images"][0]["features"] is sample["features"]  # not copied
        assert e["record"]["random_image"] != sample["key"]
        assert e["record"]["hard_image"] in hard[0] and e["record"]["hard_image"] != sample["key"]
        assert np.array_equal(e["images"][2]["features"], store.load(e["record"]["hard_image"])["features"])
    # The draws replay in a new stream (a rerun), and change with each visit (a new pass).
    replay, draws = TrainingChoices(store, hard), lambda es: [e["record"] for e in es]
    assert draws(replay(sample)) == draws(examples)
    later = [draws(replay(sample)) for _ in range(5)]
    assert any(d != draws(examples) for d in later)


def test_a_training_batch_holds_each_image_once_and_the_loss_is_the_four_way_cross_entropy(toy):
    from vilbert.data.sample_store import SampleStore
    from vilbert.modeling.outputs import ViLBERTTaskOutput

    task = _task(toy)
    store = SampleStore(toy / "train")
    choose = TrainingChoices(store, read_hard_negatives(toy / "train", store.keys))
    examples = [e for s in _samples(toy / "train")[:2] for e in choose(s)][:3]
    batch = task.collate(examples)
    assert batch.inputs["input_ids"].shape[0] == 3 * CHOICES and batch.inputs["region_features"].shape[0] == 3 * 3
    assert batch.region_rows.tolist() == [0, 0, 1, 2, 3, 3, 4, 5, 6, 6, 7, 8]
    inputs = batch.model_inputs()
    assert inputs["region_features"].shape[0] == 3 * CHOICES
    assert torch.equal(inputs["region_features"][6], batch.inputs["region_features"][4].float())
    logits = torch.tensor([[3.0, 0, 0, 0], [0, 2.0, 0, 0], [1.0, 0, 0, 0]])
    loss, accuracy = task.loss_and_metric(ViLBERTTaskOutput(pair_logits=logits.flatten()), batch)
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.zeros(3).long()).item())
    assert accuracy.item() == pytest.approx(2 / 3)


def test_zero_shot_ranks_by_the_alignment_heads_probability_of_aligned(toy):
    task = _task(toy, zero_shot=True)
    alignment = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0], [0.0, 0.0]])  # label 0: aligned
    scores = task.predict(SimpleNamespace(alignment_logits=alignment), TaskBatch({}, {}, [{}, {}]))
    assert torch.allclose(scores, alignment.log_softmax(-1)[:, 0].view(2, 2))


# --- hard negatives and the converter ---------------------------------------------------------
def test_nearest_neighbours_are_by_cosine_and_never_the_image_itself():
    from shards.neighbours import nearest_neighbours

    vectors = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [10, 1]], np.float32)
    assert nearest_neighbours(vectors, 2).tolist() == [[4, 1], [4, 0], [3, 1], [2, 1], [1, 0]]
    assert nearest_neighbours(vectors[:2], 100).tolist() == [[1], [0]]  # at most the other images


def test_hard_negatives_must_be_there_and_of_the_same_images(toy, tmp_path):
    from vilbert.data.sample_store import SampleStore

    keys = SampleStore(toy / "train").keys
    hard = read_hard_negatives(toy / "train", keys)
    assert len(hard) == len(keys) and all(key not in near for key, near in zip(keys, hard))
    with pytest.raises(ValueError, match="recompute it with `python -m shards neighbours"):
        read_hard_negatives(toy / "train", keys[1:])
    with pytest.raises(FileNotFoundError, match="python -m shards neighbours"):
        read_hard_negatives(toy / "val", SampleStore(toy / "val").keys)


def test_converter_writes_karpathys_splits_with_restval_in_train_and_hard_negatives(tmp_path):
    from shards.cli import main

    raw, out, rng = tmp_path / "raw", tmp_path / "flickr30k", np.random.default_rng(0)
    (raw / "features").mkdir(parents=True)
    splits = {"1000092795": "train", "1001773457": "restval", "1002674143": "train", "101362133": "val",
              "102617084": "test"}
    images = []
    for number, (image, split) in enumerate(splits.items()):
        n = int(rng.integers(3, 6))
        np.savez(raw / "features" / f"{image}.npz", features=rng.random((n, 8), np.float32),
                 bbox=np.array([[5 * k, 5, 5 * k + 20, 30] for k in range(n)], np.float32), num_boxes=n,
                 image_w=100, image_h=80)
        images.append({"filename": f"{image}.jpg", "imgid": number, "split": split,
                       "sentences": [{"raw": f"Caption {s} of {image}.", "tokens": [], "sentid": 5 * number + s}
                                     for s in range(5)]})
    (raw / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    assert main(["retrieval", "--karpathy", str(raw / "dataset_flickr30k.json"), "--features-dir",
                 str(raw / "features"), "--out", str(out), "--keep-boxes", "1", "100"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    written = {split: {s["key"]: s for s in _samples(out / split)} for split in ("train", "val", "test")}
    assert sorted(written["train"]) == ["1000092795", "1001773457", "1002674143"]
    assert list(written["val"]) == ["101362133"] and list(written["test"]) == ["102617084"]
    for samples in written.values():
        for key, sample in samples.items():
            assert sample["captions"] == [f"Caption {s} of {key}." for s in range(5)]
            assert len(sample["meta"]["sentences"]) == 5
    assert json.loads((out / "train/index.json").read_text())["task"]["examples"] == 15
    assert (out / "train" / HARD_NEGATIVES).is_file() and not (out / "val" / HARD_NEGATIVES).exists()

    (raw / "bad.json").write_text(json.dumps({"images": [{"filename": "1.jpg", "split": "train"}]}))
    assert main(["retrieval", "--karpathy", str(raw / "bad.json"), "--features-dir", str(raw / "features"),
                 "--out", str(tmp_path / "bad")]) == 1
