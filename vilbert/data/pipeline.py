"""The input pipeline, shard URL to batch, in one place (pretraining and every task).

    shard URLs ──(train: every rank and worker passes over all shards, each pass in a new seeded
    │             order | eval: split by rank, then worker, one pass)
      └─ read_shard ─ decode, checksum, validate (bad samples skipped and counted; samples a
          │            damaged shard never reached counted as lost; rate-limited logs)
          └─ tasks: unpack each image's examples (e.g. its questions; features shared, not copied)
              └─ shuffle buffer (train)
                  └─ pretraining: caption choice + alignment negatives
                      └─ collate: pretraining `Collator` (tokenise, IMG token + 5-d locations,
                         mask tokens/regions) -> Batch | the task's collate -> TaskBatch

Training streams forever (whatever the shard count, every rank and worker always has data);
the engine counts steps, and the samples per epoch come from the index. A pass over all
shards that yields no usable sample stops the stream with `EmptyStream` instead of spinning.
Evaluation visits each sample exactly once across ranks and workers (given at least as many
shards as ranks x workers). Mid-epoch positions are not resumable (WebDataset streams are
not): a resumed run re-seeds the stream with its step instead.

Data errors raised in a worker reach the trainer as themselves (`ShardLoader`), with their
own one-line message; the workers' sample counts (`DataHealth`) are readable at any time.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import random
import signal
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vilbert.config import VISUAL_TARGET_KL
from vilbert.data.collate import Collator
from vilbert.data.config import DataConfig
from vilbert.data.errors import DataError, EmptyStream, TooManyBadSamples
from vilbert.data.shard_index import INDEX_NAME, ShardIndex
from vilbert.data.tar_reader import UNREADABLE, read_checked_samples
from vilbert.data.tokenizer import CaptionTokenizer, load_tokenizer

log = logging.getLogger(__name__)


class DataHealth:
    """Samples, bad samples and lost samples (never reached: a damaged shard's rest) per
    worker, in memory shared with the trainer process, so the trainer can log them."""

    FIELDS = ("samples", "bad", "lost")

    def __init__(self, workers: int):
        self.counts = multiprocessing.RawArray("q", len(self.FIELDS) * max(workers, 1))

    def add(self, worker: int, field: str, n: int = 1) -> None:
        self.counts[worker * len(self.FIELDS) + self.FIELDS.index(field)] += n

    def totals(self) -> dict[str, int]:
        return {name: sum(self.counts[i::len(self.FIELDS)]) for i, name in enumerate(self.FIELDS)}


class BadSampleGuard:
    """Counts one worker's samples: logs the first few bad ones, then one line per 1,000,
    and raises once the bad and lost samples among its last WINDOW samples are more than
    `max_fraction` of WINDOW: a few bad samples clustered early never stop a healthy run,
    mostly bad data stops it after max_fraction x WINDOW of them."""

    LOG_FIRST, LOG_EVERY, WINDOW = 10, 1000, 10_000

    def __init__(self, max_fraction: float, health: DataHealth, worker: int):
        self.max_fraction, self.health, self.worker = max_fraction, health, worker
        self.recent, self.recent_bad, self.bad, self.lost = deque(maxlen=self.WINDOW), 0, 0, 0

    def _push(self, bad: bool) -> None:
        if len(self.recent) == self.WINDOW:
            self.recent_bad -= self.recent[0]
        self.recent.append(bad)
        self.recent_bad += bad

    def good(self) -> None:
        self._push(False)
        self.health.add(self.worker, "samples")

    def record(self, shard: str, key: str, reason: str) -> None:
        self.bad += 1
        self.health.add(self.worker, "bad")
        self._push(True)
        if self.bad <= self.LOG_FIRST or self.bad % self.LOG_EVERY == 0:
            log.warning("skipping bad sample %s in %s: %s (%d bad so far in this worker)", key, shard, reason,
                        self.bad)
        self._check(f"{key} in {shard}: {reason}")

    def record_lost(self, shard: str, count: int, reason: str) -> None:
        self.lost += count
        self.health.add(self.worker, "lost", count)
        for _ in range(min(count, self.WINDOW)):
            self._push(True)
        log.warning("%s: %d samples lost (%s; %d lost so far in this worker)", shard, count, reason, self.lost)
        self._check(f"{shard}: {reason}")

    def _check(self, last: str) -> None:
        if self.recent_bad > self.max_fraction * self.WINDOW:
            raise TooManyBadSamples(
                f"{self.recent_bad} of the last {len(self.recent)} samples were bad or lost (more than "
                f"data.max_bad_fraction={self.max_fraction:g} of {self.WINDOW}); last: {last}. "
                "Run `python -m shards check` on the shard set.")


@dataclass
class StreamFailure:
    """A data error raised in a worker, carried to the trainer as a stream item (DataLoader
    would re-raise it with the worker's traceback folded into the message)."""

    error_type: type
    message: str


def _check_local(spec: str) -> None:
    """FileNotFoundError for a plain local path (no URL, pipe, glob or braces) that is not there."""
    if "://" not in spec and not spec.startswith("pipe:") and not glob.has_magic(spec) and "{" not in spec \
            and not Path(spec).exists():
        raise FileNotFoundError(f"{spec}: no such shard-set directory or shard file")


def resolve_shards(spec: str, fraction: float = 1.0, seed: int = 0) -> tuple[list[str], ShardIndex | None]:
    """Shard URLs and the index (when there is one) for a shard-set directory, an
    index.json, or a URL pattern (globs and {a..b} braces expanded; pipe: kept)."""
    import braceexpand

    path = Path(spec)
    if path.is_dir() or path.name == INDEX_NAME:
        directory = path if path.is_dir() else path.parent
        index = ShardIndex.read(directory)
        return [str(directory / s.name) for s in index.select_fraction(fraction, seed)], index
    _check_local(spec)
    urls = []
    for url in braceexpand.braceexpand(spec):
        urls += sorted(glob.glob(url)) if not url.startswith("pipe:") and glob.has_magic(url) else [url]
    if fraction < 1:
        urls = sorted(random.Random(seed).sample(urls, max(1, round(fraction * len(urls)))))
    if not urls:
        raise FileNotFoundError(f"no shards match {spec!r}")
    return urls, None


class ShardStream(IterableDataset):
    """Batches for one rank; iterate it through a DataLoader with `batch_size=None`.
    `expected`: shard file name -> sample count (the index's), to count lost samples."""

    def __init__(self, urls: list[str], collator, config: DataConfig, *, train: bool, rank: int = 0,
                 world_size: int = 1, seed_offset: int = 0, feature_dim: int | None = None,
                 num_classes: int | None = None, task=None, expected: dict[str, int] | None = None):
        super().__init__()
        self.urls, self.collator, self.config, self.train = urls, collator, config, train
        self.rank, self.world_size, self.seed_offset, self.feature_dim = rank, world_size, seed_offset, feature_dim
        self.num_classes, self.expected = num_classes, expected or {}
        self.task = task  # None: pretraining (caption pairs); else a `vilbert.tasks.Task` (unpack + collate)
        self.unpack = task.unpacker(config.shards, train) if task is not None else None  # sample -> examples
        self.health = DataHealth(config.workers)

    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _passes(self, rng: random.Random):
        """Lists of shard URLs to read in turn: training, endless passes over all shards, each
        in a new order; evaluation, this rank's and worker's share, once."""
        worker, workers = self._worker()
        if not self.train:
            yield self.urls[self.rank::self.world_size][worker::workers]
            return
        while True:
            urls = list(self.urls)
            rng.shuffle(urls)
            yield urls

    def _samples(self, rng: random.Random, guard: BadSampleGuard):
        """Good samples (a task's examples), bad ones reported to the guard; a training pass
        that yields none at all raises EmptyStream."""
        for urls in self._passes(rng):
            usable = 0
            for url in urls:
                for fed in self._shard_samples(url, guard):
                    usable += len(fed)  # a task's sample may hold no example (a VQA image without questions)
                    yield from fed
            if self.train and not usable:
                raise EmptyStream(f"a full pass over the {len(urls)} shards of {self.config.shards} gave no "
                                  f"usable sample ({guard.bad} bad, {guard.lost} lost so far); run `python -m "
                                  f"shards check {self.config.shards}`")

    def _shard_samples(self, url: str, guard: BadSampleGuard):
        """One shard: for each usable sample, the list of what it feeds (itself, or the
        task's examples). Counts the shard's members against the index."""
        members, end = 0, "the shard ends early"
        for key, sample, problem in read_checked_samples(url, self.feature_dim, self.num_classes,
                                                         self.config.verify_checksums):
            if problem is not None and problem.startswith(UNREADABLE):
                end = problem
                if Path(url).name not in self.expected:
                    guard.record(url, key, problem)
                break
            members += 1
            if problem is None and self.task is not None:
                try:
                    sample = self.unpack(sample)
                except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
                    problem = f"task {self.task.name} cannot read it ({type(e).__name__}: {e})"
            if problem is not None:
                guard.record(url, key, problem)
                continue
            guard.good()
            yield sample if self.task is not None else [sample]
        missing = self.expected.get(Path(url).name, 0) - members
        if missing > 0:
            guard.record_lost(url, missing, f"{end}; the index says {self.expected[Path(url).name]} samples")

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
        guard = BadSampleGuard(self.config.max_bad_fraction, self.health, worker)
        samples = self._samples(rng, guard)
        if self.train:
            samples = self._shuffled(samples, rng)
        if self.task is None:
            samples = self._paired(samples, rng)
        batch = []
        try:
            for sample in samples:
                batch.append(sample)
                if len(batch) == self.config.batch_size:
                    yield self.collator(batch)
                    batch = []
        except DataError as e:
            yield StreamFailure(type(e), str(e))
            return
        if batch and not self.train:
            yield self.collator(batch)


class ShardLoader:
    """A ShardStream's DataLoader: yields its batches, and raises a worker's data error in the
    trainer as itself. A one-pass stream that reads the whole shard set (one rank) and yields
    no batch raises EmptyStream; split across ranks, the caller decides once the ranks' results
    are together (`vilbert.train.finetuning.predict`)."""

    def __init__(self, loader: DataLoader, stream: ShardStream):
        self.loader, self.stream = loader, stream

    @property
    def health(self) -> DataHealth:
        return self.stream.health

    def __iter__(self):
        batches = 0
        for item in self.loader:
            if isinstance(item, StreamFailure):
                raise item.error_type(item.message)
            batches += 1
            yield item
        if not batches and self.stream.world_size == 1:
            counts = self.health.totals()
            raise EmptyStream(f"{self.stream.config.shards} gave no batch: its {len(self.stream.urls)} shards hold "
                              f"{counts['samples']} usable, {counts['bad']} bad and {counts['lost']} lost samples; "
                              f"run `python -m shards check {self.stream.config.shards}`")


def shard_index(config: DataConfig) -> ShardIndex:
    """The shard set's index: the shard-set directory's, else `index` (a local copy, for URLs)."""
    path = Path(config.shards)
    if path.is_dir() or path.name == INDEX_NAME:
        return ShardIndex.read(path)
    _check_local(config.shards)
    if not config.index:
        raise ValueError(f"data.shards={config.shards!r} are URLs: the pipeline needs the shard set's {INDEX_NAME} "
                         f"(feature width, classes); set data.index to a local copy of it")
    return ShardIndex.read(config.index)


def build_loader(config: DataConfig, *, train: bool, rank: int = 0, world_size: int = 1, seed_offset: int = 0,
                 visual_target: int = VISUAL_TARGET_KL, task=None) -> tuple[ShardLoader, ShardIndex]:
    """Pretraining batches, or with `task` (a `vilbert.tasks.Task`) that task's batches."""
    urls, index = resolve_shards(config.shards, config.fraction if train else 1.0, config.fraction_seed)
    index = index or shard_index(config)  # URLs carry no index
    if task is not None:
        collator = task.collate
    else:
        collator = Collator(CaptionTokenizer(load_tokenizer(config.tokenizer)), max_regions=index.max_regions,
                            num_classes=index.num_classes, class_topk=index.class_topk, visual_target=visual_target)
    stream = ShardStream(urls, collator, config, train=train, rank=rank, world_size=world_size,
                         seed_offset=seed_offset, feature_dim=index.feature_dim, num_classes=index.num_classes,
                         task=task, expected={s.name: s.samples for s in index.shards})
    loader = DataLoader(stream, batch_size=None, num_workers=config.workers, persistent_workers=False,
                        prefetch_factor=4 if config.workers else None, worker_init_fn=_leave_stop_signals_to_trainer)
    return ShardLoader(loader, stream), index


def _leave_stop_signals_to_trainer(worker_id: int) -> None:
    """SLURM and a terminal's Ctrl-C signal every process of a job, workers included. A worker
    ended by SIGTERM, SIGINT or the scheduler's warning (USR1/USR2) would crash the step in
    which the trainer is stopping cleanly (and a forked worker would run the trainer's
    handlers), so workers ignore them; they exit when the trainer shuts them down or dies."""
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, signal.SIG_IGN)
