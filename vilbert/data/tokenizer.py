"""The BERT WordPiece tokenizer, from a local vocabulary (nothing is downloaded)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from transformers import BertTokenizerFast

from vilbert.bert_source import packaged_minilm

MAX_TEXT_LENGTH = 36  # tokens per caption, [CLS] and [SEP] included (the paper's setting)
PAD_TO_MULTIPLE = 8  # batch widths on multiples of 8 keep matmul shapes kernel-friendly (and few)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str | Path | None = None) -> BertTokenizerFast:
    """A tokenizer directory (`from_pretrained`) or a WordPiece `vocab.txt`. Loaded once per
    path and process (the vocabulary check, the training and the held-out loaders share it);
    callers only read it."""
    path = Path(path) if path else packaged_minilm()
    if not path.exists():
        raise FileNotFoundError(f"data.tokenizer={path}: no such vocab.txt or tokenizer directory")
    if path.is_dir():
        return BertTokenizerFast.from_pretrained(str(path))
    # transformers 5 ignores `vocab_file=` here (every token becomes [UNK]); `vocab=` works.
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def check_vocabulary(path: str | Path | None, model_vocab_size: int) -> None:
    """ValueError when the tokenizer can produce ids past the model's word embeddings (a
    crash at the first batch that has such a token, far from its cause)."""
    size = len(load_tokenizer(path))
    if size > model_vocab_size:
        raise ValueError(f"data.tokenizer={path or packaged_minilm()} has {size} tokens but the model's vocabulary has "
                         f"{model_vocab_size} (model.overrides.vocab_size, or the BERT of model.bert): use the "
                         "model's own vocabulary")


class CaptionTokenizer:
    """Batch tokenisation ([CLS] caption [SEP], truncated to `max_length`) padded to the
    batch's longest caption rounded up to a multiple of 8 (at most `max_length`): short
    captions cost no attention or feed-forward work on padding. On the Rust tokenizer
    directly: the transformers wrapper costs as much again per caption."""

    def __init__(self, tokenizer: BertTokenizerFast, max_length: int = MAX_TEXT_LENGTH):
        from tokenizers import Tokenizer

        self.mask_token_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)
        self.special_ids = sorted(tokenizer.all_special_ids)
        self._rust = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a private copy to configure
        self._rust.enable_truncation(max_length)
        self.max_length = max_length
        self._rust.enable_padding(pad_to_multiple_of=PAD_TO_MULTIPLE, pad_id=tokenizer.pad_token_id,
                                  pad_token=tokenizer.pad_token)
        self._encode = getattr(self._rust, "encode_batch_fast", self._rust.encode_batch)  # fast: no offsets

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns input ids and attention mask, both [len(captions), width]."""
        ids, mask, _ = self._tensors(self._encode(captions))
        return ids, mask

    def pairs(self, firsts: list[str], seconds: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[CLS] first [SEP] second [SEP], the longer of the two cut first to fit `max_length`
        (as BERT's pair truncation); returns input ids, attention mask and token type ids
        (0 for the first segment, 1 for the second)."""
        return self._tensors(self._encode(list(zip(firsts, seconds))))

    def _tensors(self, encodings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Rounding up may pass max_length (36 -> 40); only padding lies beyond it.
        return tuple(torch.from_numpy(np.array([getattr(e, field)[:self.max_length] for e in encodings]))
                     for field in ("ids", "attention_mask", "type_ids"))
