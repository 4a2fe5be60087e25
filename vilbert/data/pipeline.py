"""The input pipeline, shard URL to batch, in one place (pretraining and every task).

    shard URLs ──(train: resampled with per-rank/worker seeds | eval: split by rank, then worker)
      └─ read_shard ─ decode + validate (bad samples skipped, counted, rate-limited logs)
          └─ tasks: unpack each image's examples (e.g. its questions; features shared, not copied)
              └─ shuffle buffer (train)
                  └─ pretraining: caption choice + alignment negatives
                      └─ collate: pretraining `Collator` (tokenise, IMG token + 5-d locations,
                         mask tokens/regions) -> Batch | the task's collate -> TaskBatch

Training streams forever (resampled shards: every rank and worker always has data, whatever
the shard count); the engine counts steps, and the samples per epoch come from the index.
Evaluation visits each sample exactly once across ranks and workers (given at least as many
shards as ranks x workers). Mid-epoch positions are not resumable (WebDataset streams are
not): a resumed run re-seeds the stream with its step instead.
"""

from __future__ import annotations

import glob
import logging
import random
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vilbert.config import VISUAL_TARGET_KL
from vilbert.data.collate import Collator
from vilbert.data.format import INDEX_NAME, ShardIndex, read_checked_samples
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    shards: str = ""  # shard-set directory/index.json, or URLs: paths, globs, {000..009} braces, pipe:CMD
    index: str = ""  # with URLs: the shard set's index.json (a local copy: feature width, classes, regions)
    fraction: float = 1.0  # of the shard set's samples (whole shards, seeded; needs an index)
    fraction_seed: int = 0
    batch_size: int = 32  # per rank (the micro batch)
    workers: int = 2
    shuffle_buffer: int = 1000
    negative_probability: float = 0.5  # alignment negatives: caption of another image
    negative_buffer: int = 512
    max_bad_fraction: float = 0.01  # stop when more of the samples seen by a worker are bad
    tokenizer: str | None = None  # vocab.txt or tokenizer directory (default: bert-base-uncased vocab)
    seed: int = 0


class TooManyBadSamples(RuntimeError):
    pass


class BadSampleGuard:
    """Counts samples and bad samples of one worker; logs the first few bad ones, then one
    line per 1,000, and raises once more than `max_fraction` of at least 100 seen are bad."""

    LOG_FIRST, LOG_EVERY, MIN_SEEN = 10, 1000, 100

    def __init__(self, max_fraction: float):
        self.max_fraction, self.seen, self.bad = max_fraction, 0, 0

    def good(self) -> None:
        self.seen += 1

    def record(self, shard: str, key: str, reason: str) -> None:
        self.seen += 1
        self.bad += 1
        if self.bad <= self.LOG_FIRST or self.bad % self.LOG_EVERY == 0:
            log.warning("skipping bad sample %s in %s: %s (%d bad of %d seen)", key, shard, reason, self.bad, self.seen)
        if self.seen >= self.MIN_SEEN and self.bad > self.max_fraction * self.seen:
            raise TooManyBadSamples(f"{self.bad} of {self.seen} samples were bad (more than the allowed "
                                    f"{self.max_fraction:.1%}); last: {key} in {shard}: {reason}. "
                                    "Run `python -m shards check` on the shard set.")


def resolve_shards(spec: str, fraction: float = 1.0, seed: int = 0) -> tuple[list[str], ShardIndex | None]:
    """Shard URLs and the index (when there is one) for a shard-set directory, an
    index.json, or a URL pattern (globs and {a..b} braces expanded; pipe: kept)."""
    import braceexpand

    path = Path(spec)
    if path.is_dir() or path.name == INDEX_NAME:
        directory = path if path.is_dir() else path.parent
        index = ShardIndex.read(directory)
        return [str(directory / s.name) for s in index.select_fraction(fraction, seed)], index
    urls = []
    for url in braceexpand.braceexpand(spec):
        urls += sorted(glob.glob(url)) if not url.startswith("pipe:") and glob.has_magic(url) else [url]
    if fraction < 1:
        urls = sorted(random.Random(seed).sample(urls, max(1, round(fraction * len(urls)))))
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls, None


class ShardStream(IterableDataset):
    """Batches for one rank; iterate it through a DataLoader with `batch_size=None`."""

    def __init__(self, urls: list[str], collator, config: DataConfig, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed_offset: int = 0, feature_dim: int | None = None, task=None):
        super().__init__()
        self.urls, self.collator, self.config, self.train = urls, collator, config, train
        self.rank, self.world_size, self.seed_offset, self.feature_dim = rank, world_size, seed_offset, feature_dim
        self.task = task  # None: pretraining (caption pairs); else a `vilbert.tasks.Task` (unpack + collate)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _shard_urls(self, rng: random.Random):
        worker, workers = self._worker()
        if self.train:
            while True:  # resampling: independent of how many shards there are
                yield rng.choice(self.urls)
        else:
            yield from self.urls[self.rank::self.world_size][worker::workers]

    def _samples(self, rng: random.Random, guard: BadSampleGuard):
        for url in self._shard_urls(rng):
            for key, sample, problem in read_checked_samples(url, self.feature_dim):
                if problem is not None:
                    guard.record(url, key, problem)
                    continue
                guard.good()
                yield sample

    def _shuffled(self, samples, rng: random.Random):
        buffer = []
        for sample in samples:
            if len(buffer) < self.config.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def _paired(self, samples, rng: random.Random):
        """Pick one caption per image; with probability p swap in a caption of another image
        from a buffer of recent ones (label 1). Never the image's own caption."""
        recent: deque[tuple[str, str]] = deque(maxlen=self.config.negative_buffer)
        for sample in samples:
            caption, label = rng.choice(sample["captions"]), 0
            if recent and rng.random() < self.config.negative_probability:
                for _ in range(8):
                    other_image, other_caption = recent[rng.randrange(len(recent))]
                    if other_image != sample["image_id"]:
                        caption, label = other_caption, 1
                        break
            recent.extend((sample["image_id"], c) for c in sample["captions"])
            sample["caption"], sample["alignment_label"] = caption, label
            yield sample

    def __iter__(self):
        worker, _ = self._worker()
        seed = hash((self.config.seed, self.seed_offset, self.rank, worker)) & 0x7FFFFFFF
        rng = random.Random(seed)
        if self.task is None:
            self.collator.reseed(seed)  # its masking draws
        guard = BadSampleGuard(self.config.max_bad_fraction)
        samples = self._samples(rng, guard)
        if self.task is not None:
            samples = (example for sample in samples for example in self.task.examples(sample))
        if self.train:
            samples = self._shuffled(samples, rng)
        if self.task is None:
            samples = self._paired(samples, rng)
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == self.config.batch_size:
                yield self.collator(batch)
                batch = []
        if batch and not self.train:
            yield self.collator(batch)


def shard_index(config: DataConfig) -> ShardIndex:
    """The shard set's index: the shard-set directory's, else `index` (a local copy, for URLs)."""
    path = Path(config.shards)
    if path.is_dir() or path.name == INDEX_NAME:
        return ShardIndex.read(path)
    if not config.index:
        raise ValueError(f"data.shards={config.shards!r} are URLs: the pipeline needs the shard set's {INDEX_NAME} "
                         f"(feature width, classes); set data.index to a local copy of it")
    return ShardIndex.read(config.index)


def build_loader(config: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1, seed_offset: int = 0,
                 visual_target: int = VISUAL_TARGET_KL, task=None) -> tuple[DataLoader, ShardIndex]:
    """Pretraining batches, or with `task` (a `vilbert.tasks.Task`) that task's batches."""
    urls, index = resolve_shards(config.shards, config.fraction if train else 1.0, config.fraction_seed)
    index = index or shard_index(config)  # URLs carry no index
    if task is not None:
        collator = task.collate
    else:
        collator = Collator(CaptionTokenizer(load_tokenizer(config.tokenizer)), max_regions=index.max_regions,
                            num_classes=index.num_classes, class_topk=index.class_topk, visual_target=visual_target)
    stream = ShardStream(urls, collator, config, train=train, rank=rank, world_size=world_size,
                         seed_offset=seed_offset, feature_dim=index.feature_dim, task=task)
    loader = DataLoader(stream, batch_size=None, num_workers=config.workers, persistent_workers=False,
                        prefetch_factor=4 if config.workers else None, worker_init_fn=_leave_stop_signals_to_trainer)
    return loader, index


def _leave_stop_signals_to_trainer(worker_id: int) -> None:
    """SLURM and a terminal's Ctrl-C signal every process of a job, workers included. A worker
    ended by SIGTERM, SIGINT or the scheduler's warning (USR1/USR2) would crash the step in
    which the trainer is stopping cleanly (and a forked worker would run the trainer's
    handlers), so workers ignore them; they exit when the trainer shuts them down or dies."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
