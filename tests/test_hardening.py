"""Failure behaviour as a designed property: corrupt shards, bad writer inputs and bad
configs give a named error or a counted skip, never a hang or a crash far from the cause."""

import json
import os
import random
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from helpers import ENV, ROOT, _caption_tokenizer, train_config, write_sample_shards
from shard_fuzz import KINDS, assert_sound, run_case, summarise
from shards.check import check_shards
from shards.writer import TarShard
from vilbert.data import Collator, DataConfig, EmptyStream, ShardIndex, build_loader
from vilbert.data.errors import BadSample
from vilbert.data.pipeline import BadSampleGuard, DataHealth
from vilbert.data.sample_codec import decode_sample, encode_sample, validate_sample
from vilbert.data.tar_reader import read_checked_samples

FUZZ_CASES = 300  # a few thousand: benchmarks/shard_fuzz.py


def _collator(index):
    return Collator(_caption_tokenizer(), max_regions=index.max_regions, num_classes=index.num_classes,
                    class_topk=index.class_topk)


def _sample(**changes):
    rng = np.random.default_rng(0)
    arrays = {"features": rng.normal(size=(3, 8)).astype(np.float16),
              "boxes": np.array([[0, 0, 10, 10], [5, 5, 50, 40], [90, 70, 100, 80]], np.float32),
              "cls_index": np.array([[0, 1], [2, 3], [4, 0]], np.uint16),
              "cls_prob": np.full((3, 2), 0.4, np.float16)}
    arrays.update(changes)
    return encode_sample("k", "k", ["a caption"], 100, 80, arrays)


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


# --- samples: integrity and values -------------------------------------------------------
def test_the_checksum_finds_a_flipped_payload_byte_and_can_be_skipped():
    data = bytearray(_sample())
    data[-5] ^= 0x01
    with pytest.raises(BadSample, match="checksum mismatch"):
        decode_sample(data)
    assert decode_sample(data, verify=False)["features"].shape == (3, 8)  # data.verify_checksums=false


def test_first_format_samples_are_still_read_unverified():
    data = _sample()
    length = int.from_bytes(data[4:8], "little")
    header = data[12:12 + length].rstrip(b"\0")
    legacy = b"VLB1" + len(header).to_bytes(4, "little") + header
    legacy += b"\0" * (-len(legacy) % 16) + data[12 + length:]  # VLB1: no checksum, arrays after the aligned header
    old, new = decode_sample(legacy), decode_sample(data)
    assert old["key"] == new["key"] and all(np.array_equal(old[k], new[k]) for k in ("features", "boxes", "cls_prob"))


@pytest.mark.parametrize("changes, reason", [
    ({"cls_index": np.array([[0, 1], [2, 9], [4, 0]], np.uint16)}, "class index 9 is past the 5 classes"),
    ({"boxes": np.array([[0, 0, 10, 10], [5, 5, 500, 40], [90, 70, 100, 80]], np.float32)}, "outside"),
    ({"boxes": np.zeros((2, 4), np.float32)}, "wrong box shape"),
    ({"cls_prob": np.full((2, 2), 0.4, np.float16)}, r"class distributions of shape \(2, 2\) for 3 regions"),
    ({"cls_index": np.zeros((3, 3), np.uint16)}, "does not match cls_prob"),
    ({"features": np.zeros((3, 8), np.int32)}, "not features"),
])
def test_values_that_would_crash_later_are_bad_samples(changes, reason):
    with pytest.raises(BadSample, match=reason):
        validate_sample(decode_sample(_sample(**changes)), feature_dim=8, num_classes=5)


def test_a_header_cannot_size_an_allocation():
    data = _sample()
    header = json.loads(data[12:12 + int.from_bytes(data[4:8], "little")].rstrip(b"\0"))
    for spec in ([["<f2", [2 ** 40, 8], 0]], [["|O", [3], 0]], [["<f2", [-1, 8], 0]], [["<f2", [3, 8], 2 ** 62]]):
        header["arrays"]["features"] = spec[0]
        body = json.dumps(header).encode()
        with pytest.raises(BadSample, match="features"):
            decode_sample(b"VLB1" + len(body).to_bytes(4, "little") + body + b"\0" * 64)


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


# --- config and command-line errors -----------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("data.batch_size=0", "data.batch_size=0 must be > 0"),
    ("checkpoint.every_steps=0", "checkpoint.every_steps=0 must be > 0"),
    ("optim.lr=fast", "optim.lr='fast' is not a number"),
    ("data.workers=two", "data.workers='two' is not an integer"),
    ("model.preset=huge", "model.preset='huge' is not a preset"),
    ("deepspeed=nowhere.json", "deepspeed=nowhere.json: no such file"),
    ("data.tokenizer=/no/vocab.txt", "data.tokenizer=/no/vocab.txt: no such file"),
    ("data=5", "data must be a mapping"),
    ("model.overrides.num_hiden_layers=2", "model.overrides.num_hiden_layers is not a ViLBERTConfig field; did you "
                                           "mean num_hidden_layers"),
])
def test_config_errors_are_one_line_naming_the_key(tmp_path, capsys, override, message):
    from vilbert import cli

    assert cli.main(["pretrain", "--config", str(ROOT / "configs/toy.yaml"), f"output_dir={tmp_path}/run",
                     override]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("vilbert pretrain: error: ") and message in err and len(err.splitlines()) == 1, err


def test_overrides_are_taken_in_any_position():
    from vilbert.cli import build_parser, parse_args

    args = parse_args(build_parser(), ["pretrain", "a.b=1", "--resume", "auto", "c=2", "--debug", "d="])
    assert (args.overrides, args.resume, args.debug) == (["a.b=1", "c=2", "d="], "auto", True)
    with pytest.raises(SystemExit):
        parse_args(build_parser(), ["pretrain", "--resume", "auto", "--no-such-flag"])


def test_debug_shows_the_traceback_and_a_missing_config_is_named(tmp_path, capsys):
    from vilbert import cli

    assert cli.main(["pretrain", "--config", str(tmp_path / "none.yaml")]) == 1
    assert capsys.readouterr().err.strip() == f"vilbert pretrain: error: --config {tmp_path}/none.yaml: no such file"
    with pytest.raises(ValueError, match="data.batch_size"):
        cli.main(["pretrain", "--debug", "--config", str(ROOT / "configs/toy.yaml"), "data.batch_size=-1"])


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(tmp_path, toy_world):
    config = train_config(tmp_path, toy_world, model={"preset": "tiny", "overrides": {"vocab_size": 1000}})
    done = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)],  # (a process
                          capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=600)  # group of its own)
    assert done.returncode == 1 and "has 30522 tokens but the model's vocabulary has 1000" in done.stderr, \
        done.stderr[-2000:]


def test_convert_official_refuses_what_is_not_an_official_checkpoint(tmp_path, capsys):
    import torch

    from vilbert import cli

    config = ROOT / "tests/data/reference_vilbert_a.config.json"
    (tmp_path / "text.bin").write_text("not a checkpoint")
    torch.save({"some.other.weight": torch.zeros(3)}, tmp_path / "other.bin")
    torch.save({"epoch": 3}, tmp_path / "notensors.bin")
    torch.save({"weight": _CallsCode()}, tmp_path / "code.bin")
    for name, message in (("text.bin", "is not a PyTorch or safetensors checkpoint"),
                          ("other.bin", "gave 0 of the"), ("notensors.bin", "holds no tensors"),
                          ("code.bin", "was refused: loading it would call code (posix.system), not just read "
                                       "tensors")):
        assert cli.main(["convert-official", "--config", str(config), "--checkpoint", str(tmp_path / name),
                         "--out", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert message in err and "weights_only" not in err, err
    assert not (tmp_path / "out").exists()


class _CallsCode:
    def __reduce__(self):  # unpickling would run os.system
        import os
        return os.system, ("true",)


# --- output a person can read -------------------------------------------------------------------
def test_help_and_config_import_neither_torch_nor_transformers():
    for module in ("vilbert.cli", "shards.cli"):
        code = (f"import sys; from {module} import build_parser\ntry:\n    build_parser().parse_args(['--help'])\n"
                "except SystemExit:\n    pass\nprint(sorted({'torch', 'transformers'} & set(sys.modules)))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
        assert done.stdout.strip().splitlines()[-1] == "[]", (module, done.stdout[-500:], done.stderr[-500:])
    code = "import sys, vilbert.train.config; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert done.stdout.strip().splitlines()[-1] == "[]", (done.stdout[-500:], done.stderr[-500:])


def test_the_bert_report_is_a_summary_on_rank_zero_only(caplog, monkeypatch):
    from vilbert import ViLBERTConfig, ViLBERTForPretraining
    from vilbert.bert_source import packaged_minilm
    from vilbert.convert import from_bert

    for rank, reports in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level("INFO", logger="vilbert.convert"):
            from_bert(ViLBERTForPretraining, packaged_minilm(), ViLBERTConfig.from_preset("small"))
        infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
        assert len(infos) == reports
        if infos:  # counts, three names per kind, and how many more (the full list is at debug level)
            assert len(infos[0].splitlines()) <= 10 and "more missing" in infos[0], infos[0]


# --- a real run -----------------------------------------------------------------------------------
def test_a_run_on_damaged_shards_counts_them_and_a_run_on_nothing_stops(tmp_path):
    from vilbert.train.tracking import read_metrics

    damaged = tmp_path / "world"
    write_sample_shards(damaged / "train", n_shards=4, per_shard=25, feature_dim=32, num_classes=7)
    write_sample_shards(damaged / "val", n_shards=1, per_shard=20, feature_dim=32, num_classes=7, seed=1)
    shard = damaged / "train" / "shard-000002.tar"
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 3])
    config = train_config(tmp_path, damaged, data={"workers": 1})
    done = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config)], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    logged = [m for m in read_metrics(tmp_path / "run") if "data/lost_samples" in m]
    assert logged and logged[-1]["data/lost_samples"] > 1 and "lost in damaged shards" in done.stderr

    for path in (damaged / "train").glob("*.tar"):
        path.write_bytes(b"\0" * 100)
    done = subprocess.run([sys.executable, "-m", "vilbert", "pretrain", "--config", str(config), "--overwrite"],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "vilbert pretrain: error:" in done.stderr and str(damaged / "train") in done.stderr
    assert yaml.safe_load(config.read_text())  # the config itself was fine
