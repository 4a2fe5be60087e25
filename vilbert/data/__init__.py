"""Shard format and the streaming pipeline (names imported on first use: the format needs
numpy only, the pipeline torch)."""

import importlib

_EXPORTS = {"Batch": "collate", "Collator": "collate", "ShardIndex": "shard_index",
            "decode_sample": "sample_codec", "encode_sample": "sample_codec", "DataConfig": "config",
            "ShardStream": "pipeline", "build_loader": "pipeline", "resolve_shards": "pipeline",
            "TooManyBadSamples": "errors", "EmptyStream": "errors", "DataError": "errors",
            "load_tokenizer": "tokenizer"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vilbert.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"vilbert.data.{_EXPORTS[name]}"), name)
