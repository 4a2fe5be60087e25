"""Caption-based image retrieval (Flickr30k, Karpathy split) as the paper fine-tunes it
(vilbert_beta `vlbert_tasks.yml`, `retreival_dataset.py`), and zero-shot retrieval.

    train:   per caption a 4-way multiple choice whose right answer is always the first: the
             true pair, a random caption with the image, the caption with a random image, and
             the caption with a hard negative: an image among the caption's image's nearest
             neighbours (over mean region features, computed once and cached beside the
             training shards as HARD_NEGATIVES: `python -m shards neighbours`)
    input:   [CLS] caption [SEP] (at most 30 tokens) and up to 100 regions + the IMG token
    head:    `ViLBERTForTasks.pair_head` on h_IMG * h_CLS; zero-shot (`task.zero_shot`), the
             pretraining model's alignment head: log P(aligned)
    loss:    softmax cross-entropy over the 4 choices
    eval:    every caption of the split against every image (Flickr30k test: 5,000 x 1,000):
             each image, in the rank that reads it, is scored against every caption, in
             examples of `eval_chunk` captions that share the image's regions (a batch is
             batch_size x eval_chunk pairs, bounded whatever the split's size), so each pair is
             scored once across all ranks
    metrics: per caption the rank of its image among all images: R@1, R@5, R@10 and the median
             rank. A tie counts as a random order of the tied images would on average: the
             true image's rank is spread evenly over the tied places, so a model that scores
             everything alike gets exactly chance (R@K = K / images), never more or less

A shard sample is one image and its captions (the sample's `captions`); any captioned shard
set (a pretraining one too) is a retrieval split. Negative images and an evaluation split's
captions are read by key (`vilbert.data.sample_store`), so retrieval's shards must be local.
"""

from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vilbert.data.collate import lay_out_regions
from vilbert.data.sample_store import SampleStore
from vilbert.data.shard_index import ShardIndex
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer
from vilbert.tasks.base import Task, TaskBatch

HARD_NEGATIVES = "hard_negatives.npz"  # beside a training shard set: keys [N], neighbours [N, K] (row numbers)
CHOICES = 4  # the true pair, a random caption, a random image, a hard-negative image
RECALL_AT = (1, 5, 10)
IMAGE_FIELDS = ("features", "boxes", "image_w", "image_h")


def read_hard_negatives(shards: str | Path, keys: list[str]) -> list[list[str]]:
    """Per image of `keys` its cached nearest neighbours' keys (`HARD_NEGATIVES` beside the shards)."""
    path = Path(shards) / HARD_NEGATIVES
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no hard negatives for this training set; compute them once with "
                                f"`python -m shards neighbours {shards}` (the retrieval converters do)")
    with np.load(path, allow_pickle=False) as cached:
        stored, neighbours = [str(k) for k in cached["keys"]], cached["neighbours"]
    if sorted(stored) != sorted(keys):
        raise ValueError(f"{path} is not of this shard set's images (it has {len(stored)}, the set {len(keys)}); "
                         f"recompute it with `python -m shards neighbours {shards}`")
    of = dict(zip(stored, neighbours.tolist()))
    return [[stored[j] for j in of[key]] for key in keys]


def caption_ranks(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each caption (a row of `scores` [captions, images]) the number of images scored
    above its true image (`truth`: column per row) and the number tied with it."""
    true = scores[np.arange(len(scores)), truth][:, None]
    return (scores > true).sum(1), (scores == true).sum(1) - 1


def rank_metrics(above: np.ndarray, tied: np.ndarray) -> dict[str, float]:
    """R@K and the median rank, ties counted as the average over their orders: a caption whose
    image has `above` images above it and `tied` beside it ranks at each of above+1 ..
    above+tied+1 with equal chance."""
    above, tied = np.asarray(above), np.asarray(tied)
    metrics = {f"r{k}": float(np.mean(np.clip(k - above, 0, tied + 1) / (tied + 1))) for k in RECALL_AT}
    return {**metrics, "median_rank": float(np.median(above + 1 + tied / 2))}


def retrieval_metrics(scores: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """`rank_metrics` of a [captions, images] score matrix whose true images are `truth`."""
    return {**rank_metrics(*caption_ranks(scores, truth)), "captions": float(len(scores)),
            "images": float(scores.shape[1])}


@dataclass
class RetrievalOptions:
    max_caption_tokens: int = 30  # [CLS] and [SEP] included
    max_regions: int = 100  # regions per image (the IMG token comes on top)
    eval_chunk: int = 50  # captions scored against one image per evaluation example
    max_images: int = 0  # evaluate on the split's first N images and their captions only (0: all)
    zero_shot: bool = False  # rank by the pretraining model's alignment head (`vilbert evaluate --zero-shot`)


class Retrieval(Task):
    name = "retrieval"
    options_class = RetrievalOptions
    train_metric = "accuracy"
    val_metric = "r1"
    head = "pair_logits"

    def __init__(self, options: RetrievalOptions, index: ShardIndex, tokenizer_path: str | None = None):
        super().__init__(options, index)
        if options.eval_chunk < 1 or options.max_images < 0:
            raise ValueError(f"task.eval_chunk must be >= 1 and task.max_images >= 0, got {options.eval_chunk} and "
                             f"{options.max_images}")
        self.tokenizer = CaptionTokenizer(load_tokenizer(tokenizer_path), max_length=options.max_caption_tokens)

    def unpacker(self, shards: str, train: bool):
        store = SampleStore(shards)
        return TrainingChoices(store, read_hard_negatives(shards, store.keys)) if train else \
            AllCaptions(store, self.options.max_images, self.options.eval_chunk)

    def examples(self, sample: dict) -> list[dict]:
        raise TypeError("retrieval examples need the rest of their shard set: use `unpacker`")

    def collate(self, examples: list[dict]) -> TaskBatch:
        input_ids, attention_mask = self.tokenizer([text for e in examples for text in e["texts"]])
        images = [image for e in examples for image in e["images"]]
        features, locations, region_mask, _ = lay_out_regions(images, self.options.max_regions)
        first = np.cumsum([0] + [len(e["images"]) for e in examples])
        rows = torch.tensor([start + row for e, start in zip(examples, first) for row in e["rows"]])
        inputs = dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                      region_features=features, region_locations=locations, region_mask=region_mask)
        return TaskBatch(inputs, {}, [e["record"] for e in examples], int(attention_mask.sum()), rows)

    def _scores(self, out, batch: TaskBatch) -> torch.Tensor:
        if self.options.zero_shot:
            return out.alignment_logits.float().log_softmax(-1)[:, 0].view(len(batch), -1)  # label 0: aligned
        return out.pair_logits.float().view(len(batch), -1)

    def loss_and_metric(self, out, batch: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self._scores(out, batch)
        right = torch.zeros(len(batch), dtype=torch.long, device=scores.device)  # the true pair comes first
        return F.cross_entropy(scores, right), (scores.detach().argmax(1) == 0).float().mean()

    def predict(self, out, batch: TaskBatch) -> torch.Tensor:
        """[B, eval_chunk]: the scores of each example's captions against its image."""
        return self._scores(out, batch)

    def _matrix(self, records) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The [captions, images] score matrix from the records, its true image per caption and
        the image keys; ValueError unless every pair was scored exactly once."""
        images = list(dict.fromkeys(example["image"] for example, _ in records))
        column = {key: j for j, key in enumerate(images)}
        captions = max(example["start"] + example["n"] for example, _ in records)
        scores, times, truth = np.zeros((captions, len(images))), np.zeros((captions, len(images)), int), {}
        for example, row in records:
            rows, j = slice(example["start"], example["start"] + example["n"]), column[example["image"]]
            scores[rows, j] = row[:example["n"]]
            times[rows, j] += 1
            truth.update({example["start"] + p: j for p in example["positives"]})
        if (times != 1).any():
            counts = Counter(times.ravel().tolist())
            raise ValueError(f"retrieval scored pairs unevenly: {dict(sorted(counts.items()))} (times: pairs); every "
                             "(caption, image) pair must be scored once")
        if len(truth) != captions:
            raise ValueError(f"{captions - len(truth)} captions have no image among the {len(images)} scored")
        return scores, np.array([truth[c] for c in range(captions)]), images

    def evaluate(self, records: list[tuple[dict, list[float]]]) -> dict[str, float]:
        scores, truth, _ = self._matrix(records)
        return retrieval_metrics(scores, truth)

    def results(self, records: list[tuple[dict, list[float]]]) -> list[dict]:
        """Per caption (numbered in the split's order, image by image): its image, the images
        scored above it and tied with it (`rank_metrics` of these is the evaluation's), and the
        ten best-scored images."""
        scores, truth, images = self._matrix(records)
        above, tied = caption_ranks(scores, truth)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :10]
        return [{"caption": c, "image": images[truth[c]], "above": int(above[c]), "tied": int(tied[c]),
                 "top10": [images[j] for j in top[c]]} for c in range(len(scores))]


class TrainingChoices:
    """Training examples: per caption of a sample its 4 choices. The negatives are drawn with a
    generator seeded by the image's key and how often this process has seen it, so a stream
    replays the same draws and each pass draws new ones."""

    def __init__(self, store: SampleStore, hard_negatives: list[list[str]]):
        if len(store) < 2:
            raise ValueError("retrieval training needs at least 2 images")
        self.store, self.visits = store, Counter()
        self.hard = dict(zip(store.keys, hard_negatives))

    def _other(self, rng: np.random.Generator, key: str) -> int:
        while True:
            i = int(rng.integers(len(self.store)))
            if self.store.keys[i] != key:
                return i

    def __call__(self, sample: dict) -> list[dict]:
        key = sample["key"]
        rng = np.random.default_rng([zlib.crc32(key.encode()), self.visits[key]])
        self.visits[key] += 1
        image = {k: sample[k] for k in IMAGE_FIELDS}
        examples = []
        for caption in sample["captions"]:
            other_captions = self.store.captions[self._other(rng, key)]
            random_caption = other_captions[int(rng.integers(len(other_captions)))]
            random_key = self.store.keys[self._other(rng, key)]
            hard_key = self.hard[key][int(rng.integers(len(self.hard[key])))]
            negatives = [self.store.load(k) for k in (random_key, hard_key)]
            examples.append({"texts": [caption, random_caption, caption, caption], "rows": [0, 0, 1, 2],
                             "images": [image, *({k: s[k] for k in IMAGE_FIELDS} for s in negatives)],
                             "record": {"image": key, "random_image": random_key, "hard_image": hard_key}})
        return examples


class AllCaptions:
    """Evaluation examples: an image (of the first `max_images`, all if 0) against every
    caption of those images, `chunk` captions per example (the last padded with empty text)."""

    def __init__(self, store: SampleStore, max_images: int, chunk: int):
        keys = store.keys[:max_images or None]
        self.captions = [c for i in range(len(keys)) for c in store.captions[i]]
        first = np.cumsum([0] + [len(store.captions[i]) for i in range(len(keys))])
        self.own = {key: range(int(first[i]), int(first[i + 1])) for i, key in enumerate(keys)}  # its captions' numbers
        self.chunk = chunk

    def __call__(self, sample: dict) -> list[dict]:
        key = sample["key"]
        if key not in self.own:
            return []  # past max_images
        image, own = {k: sample[k] for k in IMAGE_FIELDS}, self.own[key]
        examples = []
        for start in range(0, len(self.captions), self.chunk):
            texts = self.captions[start:start + self.chunk]
            examples.append({"texts": texts + [""] * (self.chunk - len(texts)), "rows": [0] * self.chunk,
                             "images": [image], "record": {"image": key, "start": start, "n": len(texts),
                                                           "positives": [c - start for c in own
                                                                         if start <= c < start + len(texts)]}})
        return examples


TASK = Retrieval
