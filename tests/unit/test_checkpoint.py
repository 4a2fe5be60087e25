"""Checkpoints: tags in step order, retention, `latest`, damage found before use."""

from pathlib import Path

import pytest

from helpers import FakeEngine, flip_bytes, latest_tag, save_fake_checkpoint
from vilbert.train import checkpoint, run_dir
from vilbert.train.config import load_config


# --- checkpoints: step order, retention, latest ------------------------------------------------
def test_tags_are_ordered_by_step_number(tmp_path):
    for step in (100_000_000, 9, 10):  # the first name sorts before the others as a string
        (tmp_path / f"step{step:08d}").mkdir()
        (tmp_path / f"step{step:08d}" / checkpoint.MARKER).write_text("{}")
    (tmp_path / "step00000011").mkdir()  # incomplete: no marker
    assert checkpoint.complete_tags(tmp_path) == ["step00000009", "step00000010", "step100000000"]
    assert checkpoint.resume_tag(tmp_path, "auto") == "step100000000"
    with pytest.raises(ValueError, match="not a checkpoint tag"):
        checkpoint.tag_step("best")


def test_a_save_interrupted_midway_leaves_the_previous_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save_fake_checkpoint(tmp_path, step)
    assert checkpoint.complete_tags(tmp_path) == ["step00000002", "step00000003"]  # retention
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(FakeEngine(fail_after=2), tmp_path, {"step": 4}, keep_last=2, is_main=True)
    assert (tmp_path / "step00000004").is_dir()  # partial files are there ...
    assert latest_tag(tmp_path) == "step00000003"  # ... but nothing points at them
    assert checkpoint.resume_tag(tmp_path, "auto") == "step00000003"
    with pytest.raises(FileNotFoundError, match="incomplete"):
        checkpoint.resume_tag(tmp_path, "step00000004")


def test_latest_always_names_a_kept_checkpoint(tmp_path):
    for step in (1, 2, 3):
        save_fake_checkpoint(tmp_path, step, keep_last=1)
        assert checkpoint.complete_tags(tmp_path) == [checkpoint.tag_for(step)] == [latest_tag(tmp_path)]
    # a stale partial save of the next step (an interrupted attempt) is replaced, not mixed with
    (tmp_path / "step00000004").mkdir()
    (tmp_path / "step00000004" / "stale_rank7.pt").write_text("old")  # from a larger world size
    save_fake_checkpoint(tmp_path, 4, keep_last=2)
    assert not (tmp_path / "step00000004" / "stale_rank7.pt").exists()
    assert checkpoint.complete_tags(tmp_path) == ["step00000003", "step00000004"]
    assert (tmp_path / latest_tag(tmp_path)).is_dir()


# --- damaged checkpoints: verified before use, the newest sound one resumed -------------------------
def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_fill(path):
    path.write_bytes(bytes(path.stat().st_size))


@pytest.mark.parametrize("harm, why", [(_truncate, "bytes, .* when written"), (_zero_fill, "SHA-256"),
                                       (Path.unlink, "is missing"), (flip_bytes, "SHA-256")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_sound_one(tmp_path, harm, why):
    config = load_config(None, [f"output_dir={tmp_path / 'run'}"])
    for step in (10, 20, 30):
        save_fake_checkpoint(config.checkpoint_dir, step, keep_last=5)
    harm(config.checkpoint_dir / "step00000030" / "part1.pt")
    start = run_dir.plan(config, "auto", False)
    assert (start.tag, start.branched) == ("step00000020", True)
    assert list(start.damaged) == ["step00000030"] and __import__("re").search(why, start.damaged["step00000030"])
    run_dir.prepare(config, start, overwrite=False)
    assert checkpoint.complete_tags(config.checkpoint_dir) == ["step00000010", "step00000020"]
    assert (config.checkpoint_dir / checkpoint.DAMAGED / "step00000030" / "part0.pt").exists()  # kept for a look
    assert latest_tag(config.checkpoint_dir) == "step00000020"
    with pytest.raises(checkpoint.DamagedCheckpoint, match="step00000010 .* is damaged: part0.pt is missing"):
        (config.checkpoint_dir / "step00000010" / "part0.pt").unlink()
        checkpoint.resume_from(config.checkpoint_dir, "step00000010")  # named: no fallback


def test_every_checkpoint_damaged_stops_with_a_named_error(tmp_path):
    for step in (1, 2):
        save_fake_checkpoint(tmp_path, step)
        _zero_fill(tmp_path / checkpoint.tag_for(step) / "part0.pt")
    with pytest.raises(checkpoint.DamagedCheckpoint, match=r"every checkpoint .* \(step00000002: .*--overwrite"):
        checkpoint.resume_from(tmp_path, "auto")
    (tmp_path / "step00000003").mkdir()  # a marker from before digests: the state alone, taken as it is
    (tmp_path / "step00000003" / checkpoint.MARKER).write_text('{"step": 3}')
    assert checkpoint.resume_from(tmp_path, "auto") == checkpoint.ResumePoint("step00000003", {})
