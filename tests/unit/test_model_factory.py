"""The one model factory: `model.arch` from the registry (`model.single_stream` a deprecated
alias), `model.bert` as a directory, `minilm` or a Hugging Face name from the local cache,
and the ranges each config section declares on its fields."""

import pytest
import torch
import transformers

from helpers import HUB_COMMIT, write_hub_model
from vilbert.bert_source import resolve_bert
from vilbert.config_schema import ConfigError, build_section
from vilbert.model_factory import ModelConfig, build_model
from vilbert.modeling import SingleStreamForPretraining, SingleStreamForTasks, ViLBERTForPretraining, ViLBERTForTasks
from vilbert.train.config import check_inputs, load_config
from vilbert.train.optim import OptimConfig

SHAPE = {"v_feature_size": 16, "v_target_size": 7}


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hugging Face cache in the hub's layout holding a tiny `bert-base-uncased` (and the
    same under `google-bert/`), as `hf download` leaves it."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    bert = transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))  # the text stream of the tiny preset
    for name in ("bert-base-uncased", "google-bert/bert-base-uncased"):
        write_hub_model(cache, name, bert)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache, bert


def test_a_hugging_face_name_comes_from_the_local_cache(hub_cache):
    cache, bert = hub_cache
    for name, repo in (("bert-base-uncased", "models--bert-base-uncased"),
                       ("google-bert/bert-base-uncased", "models--google-bert--bert-base-uncased")):
        assert resolve_bert(name) == cache / repo / "snapshots" / HUB_COMMIT
    model, loaded = build_model(ModelConfig(preset="tiny", bert="bert-base-uncased"), "pretraining", SHAPE)
    assert "vilbert.text_embeddings.word_embeddings.weight" in loaded
    assert torch.equal(model.vilbert.text_embeddings.word_embeddings.weight,
                       bert.bert.embeddings.word_embeddings.weight)


def test_a_name_that_is_not_cached_says_how_to_fetch_it(hub_cache):
    with pytest.raises(ConfigError, match=r"model.bert=bert-large-cased: .*local cache .*hf download bert-large-cased"):
        resolve_bert("bert-large-cased")
    with pytest.raises(ConfigError, match="model.bert=./nowhere: no such file or directory"):
        resolve_bert("./nowhere")


def test_the_paper_config_passes_the_input_check_where_bert_base_is_cached(hub_cache, tmp_path):
    config = load_config("configs/paper.yaml")
    assert config.model.bert == "bert-base-uncased"
    check_inputs(config)  # the pre-submission check of launch/slurm.py
    with pytest.raises(ConfigError, match="hf download"):
        check_inputs(load_config("configs/paper.yaml", ["model.bert=bert-base-cased"]))


def test_model_arch_picks_the_class_and_single_stream_is_a_deprecated_alias():
    def built(model: ModelConfig, heads: str):
        return type(build_model(model, heads, SHAPE)[0])

    assert built(ModelConfig(preset="tiny"), "pretraining") is ViLBERTForPretraining
    assert built(ModelConfig(preset="tiny"), "tasks") is ViLBERTForTasks
    assert built(ModelConfig(preset="tiny", arch="single_stream"), "pretraining") is SingleStreamForPretraining
    with pytest.warns(DeprecationWarning, match="model.arch=single_stream"):
        old = load_config(None, ["model.single_stream=true", "model.preset=tiny"])
    assert old.model.arch == "single_stream" and old.model.single_stream is None
    assert built(old.model, "pretraining") is SingleStreamForPretraining
    assert built(old.model, "tasks") is SingleStreamForTasks
    with pytest.raises(ConfigError, match=r"model.arch='two_tower' is not a model; choose from \['single_stream', "
                                          r"'vilbert'\]"):
        load_config(None, ["model.arch=two_tower"])


@pytest.mark.parametrize("values, message", [
    ({"lr": 0}, "optim.lr=0 must be > 0"),
    ({"warmup_fraction": 1.5}, r"optim.warmup_fraction=1.5 must be in \[0, 1\]"),
    ({"betas": [0.9, 1.0]}, r"optim.betas=\[0.9, 1.0\] must be each in \[0, 1\)")])
def test_a_section_checks_the_ranges_its_fields_declare(values, message):
    with pytest.raises(ConfigError, match=message):
        build_section(OptimConfig, values, "optim.")
    assert build_section(OptimConfig, {"lr": 3e-4}, "optim.").lr == 3e-4
