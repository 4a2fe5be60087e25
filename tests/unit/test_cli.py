"""The command line: config errors in one line naming the key, overrides anywhere, --debug,
help without torch, refusals of what cannot work."""

import os
import subprocess
import sys

import pytest

from helpers import ENV, ROOT, train_config


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
