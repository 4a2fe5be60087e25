"""Weights from elsewhere into our models: official ViLBERT checkpoints
(facebookresearch/vilbert-multi-task, jiasenlu/vilbert_beta), BERT checkpoints, and the
encoder of a pretrained model of ours (fine-tuning's start).

Official and BERT key names share one translation table: the official text stream uses
BERT's own names, so the BERT initialisation is the official import restricted to it.
Checkpoints are read with `weights_only=True` (or safetensors): loading never runs code.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vilbert.config import ViLBERTConfig

log = logging.getLogger(__name__)

# Per-layer sub-keys. Official co-attention: query1/key1/value1 project the image stream,
# query2/key2/value2 the text stream; text queries (query2) attend over image keys/values
# (key1, value1) and their result goes through dense2/LayerNorm2 into the text stream.
_LAYER_KEYS = {
    "attention.self.query.": "attention.query.",
    "attention.self.key.": "attention.key.",
    "attention.self.value.": "attention.value.",
    "attention.output.dense.": "attention.out.",
    "attention.output.LayerNorm.": "attention.norm.",
    "intermediate.dense.": "feed_forward.up.",
    "output.dense.": "feed_forward.down.",
    "output.LayerNorm.": "feed_forward.norm.",
}
_CO_LAYER_KEYS = {
    "biattention.query2.": "text.attention.query.",
    "biattention.key1.": "text.attention.key.",
    "biattention.value1.": "text.attention.value.",
    "biOutput.dense2.": "text.attention.out.",
    "biOutput.LayerNorm2.": "text.attention.norm.",
    "t_intermediate.dense.": "text.feed_forward.up.",
    "t_output.dense.": "text.feed_forward.down.",
    "t_output.LayerNorm.": "text.feed_forward.norm.",
    "biattention.query1.": "region.attention.query.",
    "biattention.key2.": "region.attention.key.",
    "biattention.value2.": "region.attention.value.",
    "biOutput.dense1.": "region.attention.out.",
    "biOutput.LayerNorm1.": "region.attention.norm.",
    "v_intermediate.dense.": "region.feed_forward.up.",
    "v_output.dense.": "region.feed_forward.down.",
    "v_output.LayerNorm.": "region.feed_forward.norm.",
}
_LAYER_STACKS = {  # official prefix -> (our prefix, sub-key table)
    "bert.encoder.layer.": ("{base}.encoder.text_layers.", _LAYER_KEYS),
    "bert.encoder.v_layer.": ("{base}.encoder.region_layers.", _LAYER_KEYS),
    "bert.encoder.c_layer.": ("{base}.encoder.co_layers.", _CO_LAYER_KEYS),
}
_PREFIXES = {  # official prefix -> ours; {base} is the model's base_model_prefix
    "bert.embeddings.word_embeddings.": "{base}.text_embeddings.word_embeddings.",
    "bert.embeddings.position_embeddings.": "{base}.text_embeddings.position_embeddings.",
    "bert.embeddings.token_type_embeddings.": "{base}.text_embeddings.token_type_embeddings.",
    "bert.embeddings.LayerNorm.": "{base}.text_embeddings.norm.",
    "bert.v_embeddings.image_embeddings.": "{base}.region_embeddings.feature.",
    "bert.v_embeddings.image_location_embeddings.": "{base}.region_embeddings.location.",
    "bert.v_embeddings.LayerNorm.": "{base}.region_embeddings.norm.",
    "bert.t_pooler.dense.": "{base}.text_pooler.dense.",
    "bert.v_pooler.dense.": "{base}.region_pooler.dense.",
    "cls.predictions.transform.dense.": "heads.mlm.dense.",
    "cls.predictions.transform.LayerNorm.": "heads.mlm.norm.",
    "cls.predictions.decoder.": "heads.mlm.decoder.",
    "cls.predictions.bias": "heads.mlm.decoder.bias",
    "cls.bi_seq_relationship.": "heads.alignment.",
    "cls.imagePredictions.transform.dense.": "heads.region.dense.",
    "cls.imagePredictions.transform.LayerNorm.": "heads.region.norm.",
    "cls.imagePredictions.decoder.": "heads.region.decoder.",
    "vil_prediction.logit_fc.": "vqa_head.",
    "vil_logit.": "pair_head.",
    "vision_logit.": "region_head.",
}
# Keys we deliberately leave behind, with the reason the report gives.
_DROPPED = {
    r"\.biOutput\.q_dense[12]\.": "q_dense1/q_dense2 are created but never used by the official forward",
    r"^(vil_prediction_gqa|vil_binary_prediction|vil_tri_prediction|linguisic_logit)\.":
        "head of an official task this project does not train (GQA, NLVR2, SNLI-VE, word grounding)",
    r"^bert\.pooler\.": "BERT's tanh pooler; ViLBERT pools with its own ReLU poolers",
    r"^cls\.seq_relationship\.": "BERT's next-sentence head; ViLBERT's alignment head is separate",
    r"position_ids$": "a buffer, recomputed",
}


def official_to_ours(key: str, base: str) -> str | None:
    """Our name for an official (or BERT) key, None when it has no counterpart."""
    for prefix, (ours, table) in _LAYER_STACKS.items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix):].partition(".")
            for theirs, mine in table.items():
                if rest.startswith(theirs):
                    return ours.format(base=base) + f"{index}." + mine + rest[len(theirs):]
            return None
    for theirs, mine in _PREFIXES.items():
        if key.startswith(theirs):
            return mine.format(base=base) + key[len(theirs):]
    return None


def _normalise(key: str) -> str:
    """Undo wrappers and legacy spellings: DataParallel's `module.`, TF-era `gamma`/`beta`,
    and a bare BertModel's missing `bert.` prefix."""
    key = key.removeprefix("module.")
    key = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", key)
    key = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", key)
    if key.startswith(("embeddings.", "encoder.", "pooler.")):
        key = "bert." + key
    return key


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # our keys that received a tensor
    missing: list[str] = field(default_factory=list)  # our keys left at their initialisation
    unexpected: list[str] = field(default_factory=list)  # source keys we could not place
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why it is not needed

    def summary(self, limit: int | None = None) -> str:
        """Counts, then the names: all of them, or the first `limit` of each kind."""
        def names(kind: str, keys: list[str]) -> list[str]:
            shown = keys if limit is None else keys[:limit]
            more = [f"  ... and {len(keys) - len(shown)} more {kind}"] if len(keys) > len(shown) else []
            return [f"  {kind}: {k}" for k in shown] + more

        lines = [f"loaded {len(self.loaded)} tensors; {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.dropped)} dropped"]
        lines += names("missing (initialised fresh)", self.missing)
        lines += names("unexpected (ignored)", self.unexpected)
        for reason in sorted(set(self.dropped.values())):
            keys = [k for k, r in self.dropped.items() if r == reason]
            lines.append(f"  dropped {len(keys)} ({reason}): {keys[0]}{' ...' if len(keys) > 1 else ''}")
        return "\n".join(lines)


def load_state_into(model: nn.Module, source: dict[str, torch.Tensor], keep=lambda ours: True) -> LoadReport:
    """Translate `source` (official or BERT names) and copy it into `model`, strictly
    checking shapes. Keys whose translation `keep` rejects count as dropped."""
    base = getattr(model, "base_model_prefix", "vilbert")
    ours_state = model.state_dict()
    report = LoadReport()
    translated = {}
    for raw, tensor in source.items():
        key = _normalise(raw)
        reason = next((why for pattern, why in _DROPPED.items() if re.search(pattern, key)), None)
        ours = official_to_ours(key, base)
        if reason is None and ours is not None and ours not in ours_state:
            reason = f"no such part in {type(model).__name__}"
        if reason is None and ours is not None and not keep(ours):
            reason = "outside the part being initialised"
        if reason is not None:
            report.dropped[raw] = reason
        elif ours is None:
            report.unexpected.append(raw)
        else:
            if tuple(tensor.shape) != tuple(ours_state[ours].shape):
                raise ValueError(f"shape mismatch for {raw} -> {ours}: checkpoint {tuple(tensor.shape)}, "
                                 f"model {tuple(ours_state[ours].shape)}; does the config match the checkpoint?")
            translated[ours] = tensor
    model.load_state_dict(translated, strict=False)
    report.loaded = sorted(translated)
    # Tied parameters (MLM decoder = word embeddings) count as loaded when either name was.
    loaded_storage = {ours_state[k].data_ptr() for k in translated}
    report.missing = sorted(k for k, v in ours_state.items() if v.data_ptr() not in loaded_storage)
    return report


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file (.bin/.pt via torch with weights_only=True, or .safetensors) or
    from a transformers directory (model.safetensors or pytorch_model.bin)."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).exists()]
        if not found:
            raise FileNotFoundError(f"no model.safetensors or pytorch_model.bin in {path}")
        path = found[0]
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        # weights_only refused a global (torch's message goes on to advise running the file's code), or the
        # bytes are no pickle at all
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise ValueError(f"{path} is not a PyTorch or safetensors checkpoint (not a readable pickle)") from None
        raise ValueError(f"{path} was refused: loading it would call code ({found.group(1)}), not just read "
                         f"tensors") from None
    except Exception as e:  # zip and safetensors errors: a file that is not a checkpoint
        raise ValueError(f"{path} is not a PyTorch or safetensors checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors:
        raise ValueError(f"{path} holds no tensors (a {type(state).__name__}): not a model checkpoint")
    return tensors


_TEXT_STREAM = (".text_embeddings.", ".encoder.text_layers.", "heads.mlm.")


def load_bert_into(model: nn.Module, bert) -> LoadReport:
    """Copy a BERT checkpoint (directory, state dict or transformers model) into the text
    stream and MLM head of `model`, and log what was and was not loaded."""
    if isinstance(bert, nn.Module):
        state = bert.state_dict()
    elif isinstance(bert, dict):
        state = bert
    else:
        state = read_checkpoint(bert)
    report = load_state_into(model, state, keep=lambda ours: any(p in ours for p in _TEXT_STREAM))
    if os.environ.get("RANK", "0") == "0":  # every rank loads the same; one report is enough
        log.info("BERT initialisation of %s (the rest starts fresh; --debug lists every name): %s",
                 type(model).__name__, report.summary(limit=3))
        log.debug("BERT initialisation in full:\n%s", report.summary())
    return report


def from_bert(model_class: type, bert, config: ViLBERTConfig):
    """A `model_class` (any of `vilbert.modeling.registry`) whose text stream (embeddings,
    text layers, MLM head) comes from a BERT checkpoint: a local directory, a state dict, or
    a transformers model. Everything else starts from N(0, initializer_range). Returns
    (model, report)."""
    model = model_class(config)
    return model, load_bert_into(model, bert)


def load_encoder(model: nn.Module, directory: str | Path) -> frozenset[str]:
    """The two streams and co-attention layers of a pretrained model (`save_pretrained` of
    pretraining, or `vilbert convert-official` output) into `model.vilbert`; all of them
    must be there. Heads stay as they are. Returns the state-dict names loaded."""
    state = read_checkpoint(directory)
    encoder = {k.removeprefix("vilbert."): v for k, v in state.items() if k.startswith("vilbert.")}
    words = "text_embeddings.word_embeddings.weight"
    if words not in encoder and "heads.mlm.decoder.weight" in state:  # tied: saved under the decoder's name
        encoder[words] = state["heads.mlm.decoder.weight"]
    missing, unexpected = model.vilbert.load_state_dict(encoder, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory} does not fit the model: {len(missing)} encoder tensors missing (e.g. "
                         f"{missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    log.info("encoder from %s: %d tensors loaded; task heads start fresh", directory, len(encoder))
    return frozenset(f"vilbert.{k}" for k in encoder)


def convert_official(config_path: str | Path, checkpoint_path: str | Path, out_dir: str | Path | None = None,
                     model_kind: str = "auto"):
    """Load an official ViLBERT checkpoint into `ViLBERTForPretraining` or `ViLBERTForTasks`
    (auto: tasks when the checkpoint has task heads), optionally `save_pretrained` it to
    `out_dir`. Returns (model, report)."""
    from vilbert.modeling.registry import PRETRAINING, TASKS, model_class

    state = read_checkpoint(checkpoint_path)
    keys = {_normalise(k) for k in state}
    if model_kind == "auto":
        model_kind = TASKS if any(k.startswith("vil_prediction.") for k in keys) else PRETRAINING
    overrides = {}
    if "vil_prediction.logit_fc.3.weight" in keys:
        answers = next(v for k, v in state.items() if _normalise(k) == "vil_prediction.logit_fc.3.weight")
        overrides["num_vqa_answers"] = answers.shape[0]
    config = ViLBERTConfig.from_official_json(config_path, **overrides)
    model = model_class("vilbert", model_kind)(config)
    report = load_state_into(model, state)
    base = f"{model.base_model_prefix}."
    encoder = [k for k in model.state_dict() if k.startswith(base)]
    missing = [k for k in report.missing if k.startswith(base)]
    if missing:
        raise ValueError(f"{checkpoint_path} gave {len(encoder) - len(missing)} of the {len(encoder)} tensors of "
                         f"ViLBERT's streams and co-attention layers (e.g. {missing[0]} is missing; "
                         f"{len(report.unexpected)} of its keys are unknown): is it an official ViLBERT checkpoint, "
                         f"and is {config_path} its config?")
    if report.missing or report.unexpected:
        log.warning("official checkpoint %s does not fully cover %s:\n%s", checkpoint_path, type(model).__name__,
                    report.summary())
    if out_dir is not None:
        model.save_pretrained(out_dir)
    return model, report
