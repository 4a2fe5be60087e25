"""The training config: YAML and dotted overrides, batch sizes, the DeepSpeed files."""

import json

import pytest
import yaml

from helpers import ROOT
from vilbert.train.config import deepspeed_config, load_config


# --- configuration ------------------------------------------------------------------------
def test_yaml_and_dotted_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"optim": {"lr": 2e-4, "steps": 10}, "data": {"batch_size": 8}}))
    config = load_config(tmp_path / "c.yaml", ["optim.lr=5e-5", "model.overrides.v_hidden_size=64",
                                               "deepspeed=deepspeed_configs/zero3_fp16.json"])
    assert config.optim.lr == 5e-5 and config.optim.steps == 10 and config.data.batch_size == 8
    assert config.model.overrides == {"v_hidden_size": 64} and config.deepspeed.endswith("zero3_fp16.json")
    with pytest.raises(ValueError, match="optim.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    config.save(tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config
    emptied = load_config(ROOT / "configs/toy_vqa.yaml", ["model.init=", "eval.shards="])  # the README's baseline
    assert emptied.model.init == "" and emptied.eval.shards == ""


def test_batch_sizes_are_reconciled_with_the_world_size():
    config = load_config(None, ["optim.global_batch_size=512", "data.batch_size=32", "deepspeed="
                                + str(ROOT / "deepspeed_configs/zero2_bf16.json")])
    ds = deepspeed_config(config, world_size=8)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == \
        (512, 32, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        deepspeed_config(config, world_size=3)


@pytest.mark.parametrize("path", sorted((ROOT / "deepspeed_configs").glob("*.json")), ids=lambda p: p.stem)
def test_deepspeed_configs(path):
    ds = json.loads(path.read_text())
    stage, precision = path.stem.split("_")[0], path.stem.split("_")[-1]
    assert ds["zero_optimization"]["stage"] == int(stage[-1])
    assert "gradient_clipping" in ds
    assert ds.get("bf16", {}).get("enabled", False) == (precision == "bf16")
    assert ds.get("fp16", {}).get("enabled", False) == (precision == "fp16")
    assert ("offload_optimizer" in ds["zero_optimization"]) == ("offload" in path.stem)
