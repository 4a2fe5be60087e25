"""ViLBERT: two-stream vision-and-language BERT, pretraining and fine-tuning at scale.

The names below are imported on first use, so that `vilbert --help`, `python -m shards` and
the shard format do not pay for torch and transformers."""

import importlib

_EXPORTS = {"ViLBERTConfig": "vilbert.config", "PRESETS": "vilbert.config", "ViLBERTModel": "vilbert.modeling",
            "ViLBERTForPretraining": "vilbert.modeling", "ViLBERTForTasks": "vilbert.modeling",
            "SingleStreamModel": "vilbert.modeling", "SingleStreamForPretraining": "vilbert.modeling"}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vilbert' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
