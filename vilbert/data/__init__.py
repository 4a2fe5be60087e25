"""Shard format and the streaming pretraining pipeline."""

from vilbert.data.collate import Batch, Collator
from vilbert.data.format import ShardIndex, decode_sample, encode_sample
from vilbert.data.pipeline import DataConfig, ShardStream, TooManyBadSamples, build_loader, resolve_shards
from vilbert.data.tokenizer import load_tokenizer

__all__ = ["Batch", "Collator", "DataConfig", "ShardIndex", "ShardStream", "TooManyBadSamples", "build_loader",
           "decode_sample", "encode_sample", "load_tokenizer", "resolve_shards"]
