"""The streaming pipeline: tokenising, masking, batches, negatives, ranks and workers, and
what it does with damaged data (named, counted, or a stop; never a hang)."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from helpers import _caption_tokenizer, write_sample_shards
from shard_fuzz import KINDS, assert_sound, run_case, summarise
from shards.check import check_shards
from shards.writer import TarShard
from vilbert import ViLBERTConfig, ViLBERTForPretraining
from vilbert.data import (
    Collator,
    DataConfig,
    EmptyStream,
    ShardIndex,
    ShardStream,
    TooManyBadSamples,
    build_loader,
    load_tokenizer,
)
from vilbert.data.pipeline import BadSampleGuard, DataHealth, ShardLoader, resolve_shards
from vilbert.data.sample_codec import decode_sample
from vilbert.data.tar_reader import read_checked_samples, read_shard
from vilbert.data.tokenizer import CaptionTokenizer
from vilbert.losses import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer():
    return CaptionTokenizer(load_tokenizer())


def _stream(directory, tokenizer, *, train, rank=0, world_size=1, **config):
    urls, index = resolve_shards(str(directory))
    collator = Collator(tokenizer, max_regions=index.max_regions, num_classes=index.num_classes,
                        class_topk=index.class_topk)
    return ShardStream(urls, collator, DataConfig(shards=str(directory), **config), train=train, rank=rank,
                       world_size=world_size, feature_dim=index.feature_dim, num_classes=index.num_classes,
                       expected={s.name: s.samples for s in index.shards})


def test_tokenizer_uses_the_real_vocabulary(tokenizer):
    ids, mask = tokenizer(["a red dog to the left of a blue car."])
    words = load_tokenizer().convert_ids_to_tokens(ids[0, : int(mask.sum())])
    assert words == ["[CLS]", "a", "red", "dog", "to", "the", "left", "of", "a", "blue", "car", ".", "[SEP]"]
    assert ids.shape == (1, 16)  # 13 tokens, padded up to a multiple of 8


def test_eval_split_visits_every_sample_once_over_ranks_and_workers(tmp_path, tokenizer):
    directory = write_sample_shards(tmp_path / "s", n_shards=8, per_shard=7)
    seen = []
    for rank in range(2):
        stream = _stream(directory, tokenizer, train=False, rank=rank, world_size=2, batch_size=3)
        for batch in DataLoader(stream, batch_size=None, num_workers=2):
            seen += batch.keys
    assert sorted(seen) == [f"img{i:04d}" for i in range(56)]


def test_training_resamples_so_every_rank_and_worker_gets_data(tmp_path, tokenizer):
    directory = write_sample_shards(tmp_path / "s", n_shards=1, per_shard=12)
    for rank in range(2):
        stream = _stream(directory, tokenizer, train=True, rank=rank, world_size=2, batch_size=4, shuffle_buffer=5)
        loader = iter(DataLoader(stream, batch_size=None, num_workers=2))
        batches = [next(loader) for _ in range(6)]  # workers alternate: both produced batches
        assert all(len(b) == 4 for b in batches)
    # Different ranks draw differently.
    a = next(iter(_stream(directory, tokenizer, train=True, rank=0, world_size=2, batch_size=12)))
    b = next(iter(_stream(directory, tokenizer, train=True, rank=1, world_size=2, batch_size=12)))
    assert a.keys != b.keys


def _synthetic_samples(count, rng):
    samples = []
    for i in range(count):
        n = int(rng.integers(10, 37))
        xy = rng.uniform(0, 100, (n, 2)).astype(np.float32)
        samples.append(dict(key=str(i), image_id=str(i), caption="a man riding a wave on top of a surfboard",
                            alignment_label=0, image_w=200, image_h=150,
                            features=rng.normal(size=(n, 4)).astype(np.float16),
                            boxes=np.concatenate([xy, xy + 30], 1),
                            cls_index=np.tile(np.array([0, 1], np.uint16), (n, 1)),
                            cls_prob=np.full((n, 2), 0.5, np.float16)))
    return samples


def test_masking_statistics_on_10k_samples(tokenizer):
    rng = np.random.default_rng(0)
    collator = Collator(tokenizer, max_regions=36, num_classes=7, class_topk=2, seed=0)
    samples = _synthetic_samples(500, rng)
    original_ids, _ = tokenizer([samples[0]["caption"]])
    totals = dict(tokens=0, chosen=0, mask=0, same=0, regions=0, regions_chosen=0, zeroed=0)
    for _ in range(20):  # 10,000 samples
        batch = collator(samples)
        labelled = batch.masked_lm_labels != IGNORE_INDEX
        real = batch.attention_mask.bool()
        special = torch.isin(original_ids.expand_as(batch.input_ids), torch.tensor(tokenizer.special_ids))
        assert not (labelled & (special | ~real)).any()  # never [CLS], [SEP] or padding
        assert (batch.masked_lm_labels[labelled] == original_ids.expand_as(batch.input_ids)[labelled]).all()
        totals["tokens"] += int((real & ~special).sum())
        totals["chosen"] += int(labelled.sum())
        totals["mask"] += int((batch.input_ids[labelled] == tokenizer.mask_token_id).sum())
        totals["same"] += int((batch.input_ids[labelled] == batch.masked_lm_labels[labelled]).sum())
        assert not batch.masked_regions[:, 0].any()  # never the IMG token
        assert not (batch.masked_regions & (batch.region_mask == 0)).any()
        totals["regions"] += int(batch.region_mask[:, 1:].sum())
        totals["regions_chosen"] += int(batch.masked_regions.sum())
        zero_rows = (batch.region_features == 0).all(-1)
        totals["zeroed"] += int((zero_rows & batch.masked_regions).sum())
        assert not (zero_rows & ~batch.masked_regions & (batch.region_mask == 1)).any()
    assert abs(totals["chosen"] / totals["tokens"] - 0.15) < 0.01
    assert abs(totals["mask"] / totals["chosen"] - 0.8) < 0.02
    # kept: 10% unchanged plus the 1/V chance that a random token is the same one
    assert abs(totals["same"] / totals["chosen"] - 0.1) < 0.02
    assert abs(totals["regions_chosen"] / totals["regions"] - 0.15) < 0.01
    assert abs(totals["zeroed"] / totals["regions_chosen"] - 0.9) < 0.02


def test_region_layout(tokenizer):
    samples = _synthetic_samples(3, np.random.default_rng(1))
    batch = Collator(tokenizer, max_regions=36, num_classes=7, class_topk=2)(samples)
    s, n = samples[0], len(samples[0]["features"])
    slots = max(len(s["features"]) for s in samples) + 1
    assert batch.region_features.shape == (3, slots, 4) and int(batch.region_mask[0].sum()) == n + 1
    expected_img = torch.from_numpy(s["features"].astype(np.float32)).mean(0)
    assert torch.allclose(batch.region_features[0, 0].float(), expected_img, atol=1e-2)
    assert torch.equal(batch.region_locations[0, 0], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))
    x1, y1, x2, y2 = s["boxes"][0]
    area = (x2 - x1) * (y2 - y1) / (200 * 150)
    assert torch.allclose(batch.region_locations[0, 1], torch.tensor([x1 / 200, y1 / 150, x2 / 200, y2 / 150, area]))
    targets = batch.model_inputs()["region_targets"]
    assert targets.shape == (3, slots, 7) and torch.allclose(targets[0, 1:n + 1].sum(-1), torch.ones(n), atol=1e-3)
    assert torch.allclose(targets[0, 1, 0], torch.tensor(0.5))  # the stored top-k keeps its probabilities


@pytest.mark.parametrize("words, regions, width", [(3, [4, 9], 8), (7, [36, 2], 16), (40, [50, 1], 36)])
def test_batches_are_padded_to_their_longest_caption_and_largest_region_count(tokenizer, words, regions, width):
    samples = _synthetic_samples(len(regions), np.random.default_rng(2))
    for sample, n in zip(samples, regions):
        for key in ("features", "boxes", "cls_index", "cls_prob"):
            sample[key] = np.resize(sample[key], (n, sample[key].shape[1]))
    samples[0]["caption"] = " ".join(["dog"] * words)  # [CLS] + words + [SEP]: the batch's longest
    samples[1]["caption"] = "dog"
    batch = Collator(tokenizer, max_regions=36, num_classes=7, class_topk=2)(samples)
    assert batch.input_ids.shape[1] == width  # rounded up to a multiple of 8, at most 36
    assert int(batch.attention_mask[0].sum()) == min(words + 2, 36) and int(batch.attention_mask[1].sum()) == 3
    assert batch.region_features.shape[1] == min(max(regions), 36) + 1  # + the IMG token
    assert batch.region_mask.sum(1).tolist() == [min(n, 36) + 1 for n in regions]
    positions = batch.masked_lm_positions
    assert torch.equal(batch.masked_lm_labels.flatten()[positions],
                       batch.masked_lm_labels[batch.masked_lm_labels != IGNORE_INDEX])


def test_negatives_never_pair_an_image_with_its_own_caption(tmp_path, tokenizer):
    # Every caption names its image ("a photo of img0007"), so the pairing can be read off.
    directory = write_sample_shards(tmp_path / "s", n_shards=2, per_shard=50)
    stream = _stream(directory, tokenizer, train=True, batch_size=50)
    samples = [decode_sample(data) for _ in range(20) for url in stream.urls for _, data, _ in read_shard(url)]
    paired = list(stream._paired(iter(samples), random.Random(0)))
    assert len(paired) == 2000
    for sample in paired:
        assert (sample["image_id"] in sample["caption"]) == (sample["alignment_label"] == 0)
    assert abs(np.mean([s["alignment_label"] for s in paired]) - 0.5) < 0.04
    batch = next(iter(stream))
    assert abs(batch.alignment_labels.float().mean() - 0.5) < 0.25


def test_bad_samples_are_skipped_and_counted(corrupt_shards, tokenizer, caplog):
    stream = _stream(corrupt_shards, tokenizer, train=False, batch_size=8, max_bad_fraction=0.5)
    keys = [k for batch in DataLoader(stream, batch_size=None, num_workers=2) for k in batch.keys]
    assert len(keys) == len(set(keys)) and not any(k.startswith("bad") for k in keys)
    assert len(keys) >= 40 + 1  # the first shard's good samples and the second shard's intact part
    stream.config.workers = 0
    with caplog.at_level("WARNING"):
        list(stream)
    reasons = caplog.text
    for expected in ("NaN or inf in features", "empty caption", "header length", "unreadable shard", "samples lost"):
        assert expected in reasons
    counts = stream.health.totals()
    assert counts["bad"] == 3 * 2 and counts["lost"] > 1  # both passes; the truncated shard's rest counts as lost


def test_too_many_bad_samples_stop_the_run(corrupt_shards, tokenizer):
    stream = _stream(corrupt_shards, tokenizer, train=True, batch_size=8, max_bad_fraction=0.01)
    with pytest.raises(TooManyBadSamples, match="shards check"):  # raised in a worker, re-raised as itself
        for _ in ShardLoader(DataLoader(stream, batch_size=None, num_workers=2), stream):
            pass


def test_batches_train_the_model(tmp_path):
    directory = write_sample_shards(tmp_path / "s", feature_dim=24, num_classes=11)
    loader, index = build_loader(DataConfig(shards=str(directory), batch_size=6, workers=0), train=True)
    batch = next(iter(loader))
    config = ViLBERTConfig.from_preset("tiny", vocab_size=30522, v_feature_size=index.feature_dim,
                                       v_target_size=index.num_classes)
    out = ViLBERTForPretraining(config)(**batch.model_inputs())
    assert torch.isfinite(out.loss) and out.mlm_loss is not None and out.region_loss > 0


def test_shards_streamed_through_a_command_with_a_local_index(tmp_path):
    """Object stores: `pipe:` URLs (here `cat`) and a local copy of the shard set's index."""
    directory = write_sample_shards(tmp_path / "s", n_shards=2, feature_dim=24, num_classes=11)
    urls = f"pipe:cat {directory}/shard-{{000000..000001}}.tar"
    with pytest.raises(ValueError, match="data.index"):
        build_loader(DataConfig(shards=urls, batch_size=5, workers=0), train=False)
    loader, index = build_loader(DataConfig(shards=urls, index=str(directory / "index.json"), batch_size=5,
                                            workers=0), train=False)
    keys = [key for batch in loader for key in batch.keys]
    assert sorted(keys) == [f"img{i:04d}" for i in range(20)] and index.feature_dim == 24


FUZZ_CASES = 300  # a few thousand: benchmarks/shard_fuzz.py


def _collator(index):
    return Collator(_caption_tokenizer(), max_regions=index.max_regions, num_classes=index.num_classes,
                    class_topk=index.class_topk)


# --- the stream: accounting and no hangs ------------------------------------------------------
def test_a_few_early_bad_samples_do_not_stop_a_healthy_run_but_mostly_bad_data_does():
    guard = BadSampleGuard(0.01, DataHealth(1), 0)
    for i in range(50):  # clustered at the start: a 0.5% rate over the window
        guard.record("shard-0.tar", f"bad{i}", "NaN")
    for _ in range(20_000):
        guard.good()
    guard = BadSampleGuard(0.01, DataHealth(1), 0)
    with pytest.raises(Exception, match="bad or lost") as stopped:
        for i in range(1000):
            guard.good() if i % 3 == 0 else guard.record("shard-0.tar", f"bad{i}", "NaN")
    assert guard.bad == 101  # stopped at the 101st bad sample (of about 150 seen), not after 10,000
    assert "shard-0.tar" in str(stopped.value)


def test_a_truncated_shard_counts_every_sample_it_lost(tmp_path):
    directory = write_sample_shards(tmp_path / "set", n_shards=2, per_shard=10)
    shard = directory / "shard-000001.tar"
    good = sum(1 for _ in read_checked_samples(str(shard)))
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 3])
    kept = sum(1 for _, s, _ in read_checked_samples(str(shard)) if s is not None)
    loader, _ = build_loader(DataConfig(shards=str(directory), batch_size=4, workers=0), train=False)
    keys = [k for batch in loader for k in batch.keys]
    counts = loader.health.totals()
    assert len(keys) == 10 + kept and counts == {"samples": 10 + kept, "bad": 0, "lost": good - kept}
    _, problems = check_shards(str(directory))
    assert any(f"index says 10 samples, shard has {kept} ({10 - kept} lost)" in str(p) for p in problems)
    assert any("truncated" in str(p) for p in problems)


def _empty_and_unreadable(directory, kind):
    """Two shards that hold no sample: empty tars, or files that are not tars at all."""
    from vilbert.data.shard_index import ShardInfo
    directory.mkdir()
    names = ["shard-000000.tar", "shard-000001.tar"]
    for name in names:
        if kind == "empty":
            TarShard(directory / name).close()
        else:
            (directory / name).write_bytes(b"garbage" * 100)
    ShardIndex(shards=[ShardInfo(n, 0 if kind == "empty" else 5) for n in names], feature_dim=8, num_classes=5,
               class_topk=3).write(directory)
    return directory


@pytest.mark.parametrize("kind", ["empty", "unreadable"])
@pytest.mark.parametrize("train", [True, False])
def test_a_stream_with_nothing_to_give_stops_with_a_named_error(tmp_path, kind, train):
    directory = _empty_and_unreadable(tmp_path / kind, kind)
    loader, _ = build_loader(DataConfig(shards=str(directory), batch_size=4, workers=1), train=train)
    with pytest.raises(EmptyStream, match=str(directory)):
        next(iter(loader))


def test_a_rank_without_shards_of_a_split_is_not_an_error_but_an_empty_split_is(tmp_path):
    import torch

    from vilbert.train.finetuning import predict

    directory = write_sample_shards(tmp_path / "one", n_shards=1, per_shard=5)
    config = DataConfig(shards=str(directory), batch_size=4, workers=0)
    assert list(build_loader(config, train=False, rank=1, world_size=2)[0]) == []  # rank 0 reads the one shard
    with pytest.raises(EmptyStream, match="gave no example to evaluate on any rank"):
        predict(torch.nn.Linear(1, 1), [], SimpleNamespace(name="vqa"), torch.float32, "cpu", source=str(directory))


# --- the fuzz test ---------------------------------------------------------------------------
def test_seeded_corruptions_are_named_counted_or_stopped(tmp_path, capsys):
    directory = write_sample_shards(tmp_path / "set", n_shards=2, per_shard=6)
    original = {p.name: p.read_bytes() for p in directory.glob("*.tar")}
    collator, rng, cases = _collator(ShardIndex.read(directory)), random.Random(0), []
    for _ in range(FUZZ_CASES):
        case = run_case(directory, original, rng, collator)
        assert_sound(case)
        cases.append(case)
    assert {c.kind for c in cases} == set(KINDS)
    with capsys.disabled():
        print("\n" + summarise(cases))
