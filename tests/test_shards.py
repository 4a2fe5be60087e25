"""Shard writing from each input format, the index and `shards check`."""

import base64
import json

import numpy as np
import pytest

from shards.build import ShardOptions, write_shard_sets
from shards.cli import main as shards_main
from shards.sources import FeatureFolderSource, read_captions, select_boxes
from shards.toyworld import write_toyworld
from vilbert.data.sample_codec import decode_sample
from vilbert.data.shard_index import ShardIndex
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
