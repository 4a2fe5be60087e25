"""Shard writing from each input format, the index and `shards check`."""

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import ENV, ROOT
from shards.build import ShardOptions, write_shard_sets
from shards.cli import main as shards_main
from shards.sources import FeatureFolderSource, read_captions, select_boxes
from shards.toyworld import write_toyworld
from vilbert.data import ShardIndex
from vilbert.data.sample_codec import decode_sample
from vilbert.data.tar_reader import read_shard


def _detections(n_images=5, classes=9, features=16, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_images):
        n = int(rng.integers(12, 20))
        probs = rng.dirichlet(np.ones(classes) * 0.3, size=n).astype(np.float32)
        xy = rng.uniform(0, 100, (n, 2))
        out.append(dict(image_id=f"img{i}", image_w=320, image_h=240, num_boxes=n,
                        boxes=np.concatenate([xy, xy + 50], 1).astype(np.float32),
                        features=rng.normal(size=(n, features)).astype(np.float32), cls_prob=probs))
    return out


def _read_all(directory):
    return {key: decode_sample(data) for shard in sorted(directory.glob("*.tar")) for key, data, _ in read_shard(shard)}


def _check_round_trip(records, out_dir, captions):
    samples = _read_all(out_dir / "train")
    assert sorted(samples) == sorted(r["image_id"] for r in records)
    index = ShardIndex.read(out_dir / "train")
    assert index.num_samples == len(records) and index.feature_dim == 16 and index.num_classes == 9
    for r in records:
        s = samples[r["image_id"]]
        kept = select_boxes(r, 10, 36, 0.0)
        np.testing.assert_allclose(s["features"], kept["features"], atol=1e-2)  # float16
        np.testing.assert_array_equal(s["boxes"], kept["boxes"])
        assert s["captions"] == captions[r["image_id"]] and (s["image_w"], s["image_h"]) == (320, 240)
        top = np.take_along_axis(kept["cls_prob"], s["cls_index"].astype(np.int64), 1)
        np.testing.assert_allclose(s["cls_prob"], top, atol=1e-3)
        assert (s["cls_prob"].astype(np.float32).max(1) >= kept["cls_prob"].max(1) - 1e-3).all()


def test_tsv_round_trip(tmp_path):
    records = _detections()
    with open(tmp_path / "feat.tsv", "w") as f:
        for r in records:
            b64 = [base64.b64encode(r[k].tobytes()).decode() for k in ("boxes", "features", "cls_prob")]
            f.write("\t".join([r["image_id"], "320", "240", str(r["num_boxes"]), *b64]) + "\n")
    captions = {r["image_id"]: [f"caption of {r['image_id']}", "another one"] for r in records}
    (tmp_path / "caps.json").write_text(json.dumps(captions))
    assert shards_main(["write", "--tsv", str(tmp_path / "feat.tsv"), "--captions", str(tmp_path / "caps.json"),
                        "--out", str(tmp_path / "out"), "--samples-per-shard", "2", "--class-topk", "4",
                        "--conf-threshold", "0"]) == 0
    assert len(ShardIndex.read(tmp_path / "out" / "train").shards) == 3
    _check_round_trip(records, tmp_path / "out", captions)


def test_feature_folder_round_trip_and_pickle_refusal(tmp_path):
    records = _detections()
    (tmp_path / "feats").mkdir()
    for r in records[:3]:
        np.savez(tmp_path / "feats" / f"{r['image_id']}.npz", features=r["features"], bbox=r["boxes"],
                 num_boxes=r["num_boxes"], image_w=320, image_h=240, cls_prob=r["cls_prob"])
    for r in records[3:]:  # the official extractor's layout: a pickled dict in .npy
        np.save(tmp_path / "feats" / f"{r['image_id']}.npy", {**r, "bbox": r["boxes"]}, allow_pickle=True)
    lines = [json.dumps({"image_id": r["image_id"], "caption": f"caption {r['image_id']}"}) for r in records]
    (tmp_path / "caps.jsonl").write_text("\n".join(lines))
    captions = read_captions(tmp_path / "caps.jsonl")
    with pytest.raises(ValueError, match="allow-pickle"):
        FeatureFolderSource(tmp_path / "feats").load("img4")
    source = FeatureFolderSource(tmp_path / "feats", allow_pickle=True)
    write_shard_sets(source.ids, source.load, captions, tmp_path / "out", ShardOptions(class_topk=4), source="test",
                     prepare=lambda r: select_boxes(r, 10, 36, 0.0))
    _check_round_trip(records, tmp_path / "out", captions)


def test_box_selection_keeps_the_confident_ones_within_bounds():
    record = _detections(1)[0]
    confidence = record["cls_prob"][:, 1:].max(1)
    kept = select_boxes(record, 10, 12, conf_threshold=0.99)  # nothing passes: the 10 most confident
    assert len(kept["boxes"]) == 10
    assert set(np.round(kept["cls_prob"][:, 1:].max(1), 6)) == set(np.round(np.sort(confidence)[-10:], 6))
    assert len(select_boxes(record, 1, 12, conf_threshold=0.0)["boxes"]) == 12


def test_val_split_is_by_image_and_disjoint(tmp_path):
    records = {r["image_id"]: r for r in _detections(40)}
    captions = {i: ["a caption"] for i in records}
    indexes = write_shard_sets(list(records), records.get, captions, tmp_path, ShardOptions(val_fraction=0.3),
                               source="test")
    train, val = set(_read_all(tmp_path / "train")), set(_read_all(tmp_path / "val"))
    assert train.isdisjoint(val) and train | val == set(records) and 4 <= len(val) <= 20
    assert indexes["val"].num_samples == len(val)


def test_fraction_selection_is_reproducible_and_nested(tmp_path):
    write_toyworld(tmp_path, 800, 0, feature_dim=8, options=ShardOptions(samples_per_shard=50))
    index = ShardIndex.read(tmp_path / "train")
    quarter, half = index.select_fraction(0.25, seed=3), index.select_fraction(0.5, seed=3)
    assert quarter == index.select_fraction(0.25, seed=3)
    assert {s.name for s in quarter} < {s.name for s in half}
    assert sum(s.samples for s in quarter) == 200 and sum(s.samples for s in half) == 400
    assert quarter != index.select_fraction(0.25, seed=4)


def test_check_reports_every_kind_of_bad_sample(tmp_path, corrupt_shards):
    assert shards_main(["check", str(corrupt_shards)]) == 1


# --- writers ----------------------------------------------------------------------------------
def _features(directory, n=4, dim=8):
    directory.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        np.savez(directory / f"img{i}.npz", features=rng.normal(size=(3, dim)), image_w=100, image_h=80,
                 boxes=np.array([[0, 0, 10, 10], [5, 5, 50, 40], [60, 30, 99, 79]], np.float32))
    return directory


def _write(tmp_path, *extra):
    return subprocess.run([sys.executable, "-m", "shards", "write", "--features-dir", str(tmp_path / "features"),
                           "--captions", str(tmp_path / "captions.json"), "--out", str(tmp_path / "out"),
                           "--keep-boxes", "1", "36", *extra], capture_output=True, text=True, env=ENV, cwd=ROOT)


def test_a_failed_write_leaves_nothing_that_looks_complete(tmp_path):
    features = _features(tmp_path / "features")
    (tmp_path / "captions.json").write_text(json.dumps({f"img{i}": f"caption {i}" for i in range(4)}))
    np.savez(features / "img2.npz", features=np.full((3, 8), np.nan), image_w=100, image_h=80, boxes=np.ones((3, 4)))
    done = _write(tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("python -m shards write: error: image img2: NaN or inf in "
                                                   "features"), done.stderr
    assert not (tmp_path / "out" / "train").exists() and not list((tmp_path / "out").glob(".*partial*"))

    done = _write(tmp_path, "--lenient")
    assert done.returncode == 0 and "1 inputs skipped" in done.stderr and "img2" in done.stderr
    assert ShardIndex.read(tmp_path / "out" / "train").num_samples == 3


def test_a_killed_writers_partial_set_is_removed_by_the_next_write(tmp_path, caplog):
    from vilbert.staging import StagedDirectory

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".train.partial-{dead.stdout.strip()}"  # what SIGKILL mid-write leaves behind
    (stale / "x").mkdir(parents=True)
    live = tmp_path / f".train.partial-{os.getppid()}"  # a writer still at work: named, left alone
    live.mkdir()
    with StagedDirectory(tmp_path / "train") as staged:
        (staged.path / "shard.tar").write_text("x")
    assert not stale.exists() and live.exists() and (tmp_path / "train/shard.tar").exists()
    assert f"removing {stale}" in caplog.text and f"process {os.getppid()}" in caplog.text


def test_check_of_a_set_without_shards_fails(tmp_path):
    ShardIndex(shards=[], feature_dim=8, num_classes=5, class_topk=3, max_regions=6, source="test").write(tmp_path)
    done = subprocess.run([sys.executable, "-m", "shards", "check", str(tmp_path)], capture_output=True, text=True,
                          env=ENV, cwd=ROOT)
    assert done.returncode == 1 and "holds no shards" in done.stdout, done.stdout + done.stderr


def test_wrong_but_parsing_inputs_are_errors_and_writing_nothing_fails(tmp_path):
    _features(tmp_path / "features")
    (tmp_path / "captions.json").write_text(json.dumps({"img0": "a", "img1": "b", "img2": "c", "img3": "d",
                                                        "img99": "no such image"}))
    done = _write(tmp_path)
    assert done.returncode == 1 and "image img99" in done.stderr and "--lenient" in done.stderr
    (tmp_path / "captions.json").write_text(json.dumps({"other": "caption"}))
    done = _write(tmp_path, "--lenient")
    assert done.returncode == 1 and "nothing written" in done.stderr
    (tmp_path / "captions.jsonl").write_text('{"image_id": "img0", "caption": "a"}\n{not json\n')
    done = subprocess.run([sys.executable, "-m", "shards", "write", "--features-dir", str(tmp_path / "features"),
                           "--captions", str(tmp_path / "captions.jsonl"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.returncode == 1 and "captions.jsonl:2: not JSON" in done.stderr


def test_a_tsv_line_that_disagrees_with_num_boxes_is_named(tmp_path):
    import base64

    from shards.sources import InputError, TsvSource

    def b64(a):
        return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()

    line = ["img7", "100", "80", "3", b64(np.ones((2, 4))), b64(np.ones((3, 8)))]
    (tmp_path / "f.tsv").write_text("\t".join(["img6", "100", "80", "1", b64(np.ones((1, 4))), b64(np.ones((1, 8)))])
                                    + "\n" + "\t".join(line) + "\n")
    with pytest.raises(InputError, match=r"f.tsv:2: image img7: boxes: 8 float32 values do not make 3 rows"):
        TsvSource([tmp_path / "f.tsv"]).load("img7")
