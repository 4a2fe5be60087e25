"""The toy world: a procedural vision-and-language dataset in the real shard format.

Each image is a scene of objects (classes named by English words, with a colour and a
size) in a frame. A pretend detector looks at it and proposes regions: a tight box and
jittered boxes around every object plus background boxes. Each region gets

- a feature vector: ReLU(P (q * (e_class + e_colour + e_size) + (1 - q) * e_setting + noise)),
  where q is how much of the object the box covers; 2048-d like ResNet's pooled features;
- a detector-like class distribution over background + the classes (noisy, confident on
  tight boxes, unsure on loose ones);

Every scene has a setting (a park, a kitchen, a beach, snow) that is the background of all
its regions, so it shows in the image as a whole (and in the IMG token, the mean of the
regions) the way a real scene's context does. The scene is described by 3-5 captions
naming objects, colours, sizes, counts and spatial relations, some ending with the
setting. How many classes, colours, objects and regions, how noisy the features and how
often a caption names the setting are `WorldOptions`. The scene itself travels in the
sample's `meta` (setting, objects with their attributes, boxes and regions), so that
questions, referring expressions and retrieval sets can be derived from the same images.

World parameters (embeddings, projection) depend on the seed only; image i is generated
from (seed, i) alone, so any image is reproducible and train/val never overlap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from shards.writer import TarShard, all_or_nothing, shard_name
from vilbert.data.shard_index import ShardIndex, ShardInfo
from vilbert.staging import StagedDirectory

CLASSES = ["dog", "cat", "horse", "cow", "sheep", "bird", "car", "bus", "truck", "bicycle", "boat", "train",
           "chair", "table", "bed", "lamp", "cup", "bottle", "bowl", "ball", "kite", "umbrella", "bag", "book",
           "clock", "vase", "tree", "flower", "rock", "house", "fence", "bench", "sign", "apple", "banana",
           "orange", "pizza", "cake", "phone", "laptop", "television", "guitar", "hat", "shoe", "shirt", "box",
           "balloon", "boot"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"]
SIZES = ["small", "large"]
SETTINGS = ["in a park", "in a kitchen", "on a beach", "in the snow"]
BACKGROUND = "background"  # class 0 of the detector, as in the Visual Genome detector's 1601 classes
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six"]
_PLURALS = {"sheep": "sheep", "bus": "buses", "box": "boxes", "bench": "benches", "shelf": "shelves"}
MAX_REGIONS = 36
LATENT_DIM = 64


@dataclass(frozen=True)
class WorldOptions:
    """What the world holds. The defaults are the toy-transfer recipe (docs/toy-transfer.md),
    found by measuring: a world small enough that a CPU run of a few thousand
    image-caption pairs per word sees each word with each region often, and one whose captions
    never name the setting, so alignment can only be learnt from the objects."""
    classes: int = 12  # the first N of CLASSES (48 before the recipe)
    colours: int = 6  # the first N of COLOURS (11)
    objects: tuple[int, int] = (2, 4)  # per scene, inclusive ((2, 6))
    boxes_per_object: tuple[int, int] = (1, 3)  # the tight box and jittered ones, inclusive ((2, 5))
    background_boxes: tuple[int, int] = (2, 6)  # inclusive, topped up to min_regions ((4, 15))
    min_regions: int = 4  # (10)
    noise: float = 0.5  # std of the latent noise of every region
    setting_mention: float = 0.0  # how often a caption names the setting (1.0): never, so no shortcut
    listing_colours: bool = False  # "a picture of a red dog and a blue cup" instead of "... a dog and a cup"
    detector_colours: bool = False  # the detector's classes are colour-object pairs ("red dog"), as an
    #                                  attribute-aware detector's: its class distribution then tells colours apart

    def __post_init__(self):
        checks = {"classes": 2 <= self.classes <= len(CLASSES), "colours": 2 <= self.colours <= len(COLOURS),
                  "objects": 1 <= self.objects[0] <= self.objects[1] <= len(NUMBERS) - 1,
                  "boxes_per_object": 1 <= self.boxes_per_object[0] <= self.boxes_per_object[1],
                  "background_boxes": 0 <= self.background_boxes[0] <= self.background_boxes[1],
                  "min_regions": 1 <= self.min_regions <= MAX_REGIONS, "noise": self.noise >= 0,
                  "setting_mention": 0 <= self.setting_mention <= 1}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"toy world: {', '.join(f'{n}={getattr(self, n)!r}' for n in bad)} out of range "
                             f"(at most {len(CLASSES)} classes, {len(COLOURS)} colours, {len(NUMBERS) - 1} objects)")

    @property
    def class_names(self) -> list[str]:
        return CLASSES[:self.classes]

    @property
    def colour_names(self) -> list[str]:
        return COLOURS[:self.colours]

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def plural(word: str) -> str:
    return _PLURALS.get(word, word + "s")


def relation(box_a: np.ndarray, box_b: np.ndarray) -> str:
    """Where box a is with respect to box b, from their centres (y grows downwards)."""
    (ax, ay), (bx, by) = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "to the left of" if ax < bx else "to the right of"
    return "above" if ay < by else "below"


class ToyWorld:
    def __init__(self, seed: int = 0, feature_dim: int = 2048, options: WorldOptions | None = None):
        """`options.setting_mention`: how often a caption names the setting. The setting is in
        every region, so captions that always name it let alignment be learnt from the setting
        alone (at most 1 - 1/8 = 0.875 accuracy: a negative caption has the same setting 1 time
        in 4), a shortcut past the words-to-regions grounding that transfers to VQA. Embeddings
        are drawn for every class and colour whatever the options, so one seed keeps its
        vectors across worlds of different sizes."""
        rng = np.random.default_rng([seed, 0xC0FFEE])
        self.seed, self.feature_dim, self.options = seed, feature_dim, options or WorldOptions()
        self.class_emb = rng.normal(size=(len(CLASSES), LATENT_DIM)).astype(np.float32)
        self.colour_emb = 0.8 * rng.normal(size=(len(COLOURS), LATENT_DIM)).astype(np.float32)
        self.size_emb = 0.5 * rng.normal(size=(len(SIZES), LATENT_DIM)).astype(np.float32)
        self.background_emb = rng.normal(size=(len(SETTINGS), LATENT_DIM)).astype(np.float32)  # one per setting
        # the class the detector mistakes each class for: a permutation of the world's classes
        self.lookalike = np.argsort(rng.permutation(len(CLASSES))[:self.options.classes])
        import torch  # here, not at the top: `python -m shards --help` reads WorldOptions without torch

        self.projection = torch.from_numpy(
            (rng.normal(size=(LATENT_DIM, feature_dim)) / np.sqrt(LATENT_DIM)).astype(np.float32))

    @property
    def num_classes(self) -> int:  # the detector's: background + the world's classes (or colour-class pairs)
        return len(self.class_names)

    @property
    def class_names(self) -> list[str]:
        o = self.options
        if o.detector_colours:
            return [BACKGROUND] + [f"{colour} {name}" for name in o.class_names for colour in o.colour_names]
        return [BACKGROUND] + o.class_names

    def detector_label(self, cls: np.ndarray, colour: np.ndarray) -> np.ndarray:
        """The detector's class index (0 is background) of objects of class `cls` and colour `colour`."""
        return 1 + (cls * self.options.colours + colour if self.options.detector_colours else cls)

    # --- one image (arrays over its objects and regions) ------------------------------
    def scene(self, rng: np.random.Generator) -> dict:
        width, height = int(rng.integers(400, 641)), int(rng.integers(300, 481))
        o = self.options
        n = int(rng.integers(o.objects[0], o.objects[1] + 1))
        size = rng.integers(len(SIZES), size=n)
        extent = np.where(size[:, None] == 0, rng.uniform(0.1, 0.2, (n, 2)), rng.uniform(0.3, 0.5, (n, 2)))
        extent = extent * [width, height]
        corner = rng.uniform(0, 1, (n, 2)) * ([width, height] - extent)
        return dict(width=width, height=height, setting=int(rng.integers(len(SETTINGS))),
                    cls=rng.integers(o.classes, size=n), colour=rng.integers(o.colours, size=n), size=size,
                    box=np.round(np.concatenate([corner, corner + extent], 1), 1).astype(np.float32))

    def regions(self, scene: dict, rng: np.random.Generator):
        """Boxes [N, 4], the object each region shows (-1: background) and its coverage q:
        per object a tight box (q = 1) and jittered ones, then background boxes."""
        width, height, n, o = scene["width"], scene["height"], len(scene["cls"]), self.options
        per_object = rng.integers(o.boxes_per_object[0], o.boxes_per_object[1] + 1, size=n)
        owner = np.repeat(np.arange(n), per_object)
        first = np.concatenate([[0], np.cumsum(per_object)[:-1]])
        coverage = rng.uniform(0.5, 0.9, len(owner)).astype(np.float32)
        coverage[first] = 1.0
        box = scene["box"][owner]
        extent = np.tile(box[:, 2:] - box[:, :2], 2)
        object_boxes = box + rng.uniform(-1, 1, (len(owner), 4)) * (1 - coverage)[:, None] * extent
        wanted = len(owner) + rng.integers(o.background_boxes[0], o.background_boxes[1] + 1)
        background = max(int(np.clip(wanted, o.min_regions, MAX_REGIONS)) - len(owner), 0)
        wh = rng.uniform(0.1, 0.6, (background, 2)) * [width, height]
        xy = rng.uniform(0, 1, (background, 2)) * ([width, height] - wh)
        boxes = np.concatenate([object_boxes, np.concatenate([xy, xy + wh], 1)])[:MAX_REGIONS]
        boxes = np.clip(boxes, 0, [width - 1, height - 1, width, height]).astype(np.float32)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        owner = np.concatenate([owner, np.full(background, -1)])[:MAX_REGIONS]
        coverage = np.concatenate([coverage, np.zeros(background, np.float32)])[:MAX_REGIONS]
        return boxes, owner, coverage

    def latents(self, scene: dict, owner: np.ndarray, coverage: np.ndarray, rng: np.random.Generator):
        objects = owner[owner >= 0]
        content = np.zeros((len(owner), LATENT_DIM), np.float32)
        content[owner >= 0] = (self.class_emb[scene["cls"][objects]] + self.colour_emb[scene["colour"][objects]]
                               + self.size_emb[scene["size"][objects]])
        background = self.background_emb[scene["setting"]]
        noise = rng.normal(scale=self.options.noise, size=content.shape).astype(np.float32)
        return coverage[:, None] * content + (1 - coverage[:, None]) * background + noise

    def class_distribution(self, scene: dict, owner: np.ndarray, coverage: np.ndarray, rng) -> np.ndarray:
        """Detector-like: confident on tight boxes but sometimes taken in by a look-alike class,
        unsure between object and background on loose ones, background on background boxes;
        plus noise over every class."""
        logits = rng.normal(size=(len(owner), self.num_classes)).astype(np.float32)
        is_object = owner >= 0
        rows, classes = np.flatnonzero(is_object), scene["cls"][owner[is_object]]
        colours = scene["colour"][owner[is_object]]
        logits[rows, self.detector_label(classes, colours)] += 6.0 * coverage[is_object]
        logits[rows, self.detector_label(self.lookalike[classes], colours)] += \
            6.0 * coverage[is_object] * rng.uniform(0, 1.1, len(rows))
        logits[:, 0] += np.where(is_object, 3.0 * (1 - coverage), 5.0)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return probs / probs.sum(1, keepdims=True)

    def captions(self, scene: dict, rng: np.random.Generator) -> list[str]:
        cls, colour, size, box = scene["cls"], scene["colour"], scene["size"], scene["box"]
        n = len(cls)

        def name(i, with_size):
            return f"{SIZES[size[i]] + ' ' if with_size else ''}{COLOURS[colour[i]]} {CLASSES[cls[i]]}"

        def describe_one():
            return f"a {name(rng.integers(n), True)}"

        def describe_pair():
            a, b = rng.choice(n, 2, replace=False)
            return f"a {name(a, rng.random() < 0.5)} {relation(box[a], box[b])} a {name(b, rng.random() < 0.5)}"

        def count():
            counts = np.bincount(cls)
            c = int(counts.argmax()) if rng.random() < 0.7 else int(cls[rng.integers(n)])
            k = int(counts[c])
            return f"there {'is' if k == 1 else 'are'} {NUMBERS[k]} {CLASSES[c] if k == 1 else plural(CLASSES[c])}"

        def listing():
            words = [f"a {name(i, False) if self.options.listing_colours else CLASSES[cls[i]]}"
                     for i in rng.permutation(n)]
            return "a picture of " + (", ".join(words[:-1]) + " and " if n > 1 else "") + words[-1]

        templates = (describe_one, describe_pair, count, listing) if n > 1 else (describe_one, count, listing)
        setting = SETTINGS[scene["setting"]]
        captions = [templates[t]() for t in rng.integers(len(templates), size=int(rng.integers(3, 6)))]
        return [f"{c} {setting}." if rng.random() < self.options.setting_mention else f"{c}." for c in captions]

    # --- many images ----------------------------------------------------------------
    def generate(self, start: int, count: int, chunk: int = 256):
        """Yield records (shard-writer input, plus `captions` and `scene`) of images
        start..start+count-1. Region features are projected a chunk at a time."""
        import torch

        for begin in range(start, start + count, chunk):
            pending = []
            for index in range(begin, min(begin + chunk, start + count)):
                rng = np.random.default_rng([self.seed, index])
                scene = self.scene(rng)
                boxes, owner, coverage = self.regions(scene, rng)
                pending.append((index, scene, boxes, owner, self.latents(scene, owner, coverage, rng),
                                self.class_distribution(scene, owner, coverage, rng), self.captions(scene, rng)))
            # torch for the projection and the float16 cast: several times faster than numpy's.
            latents = torch.from_numpy(np.concatenate([p[4] for p in pending]))
            features = (latents @ self.projection).relu_().half().numpy()  # detector features are >= 0
            offsets = np.cumsum([0] + [len(p[2]) for p in pending])
            for (index, scene, boxes, owner, _, cls_prob, captions), lo, hi in zip(pending, offsets, offsets[1:]):
                yield dict(image_id=f"toy{index:08d}", image_w=scene["width"], image_h=scene["height"],
                           boxes=boxes, features=features[lo:hi], cls_prob=cls_prob, captions=captions,
                           scene=_readable(scene, owner))


def _readable(scene: dict, owner: np.ndarray) -> dict:
    """The scene with words instead of ids, and each object's regions, for the sample's meta."""
    attributes = zip(scene["cls"], scene["colour"], scene["size"], scene["box"].tolist())
    objects = [dict(name=CLASSES[c], colour=COLOURS[k], size=SIZES[s], box=b,
                    regions=np.flatnonzero(owner == i).tolist()) for i, (c, k, s, b) in enumerate(attributes)]
    return {"setting": SETTINGS[scene["setting"]], "objects": objects}


# --- images for task converters ----------------------------------------------------------
class GeneratedImages:
    """Generated images by id: a `shards.sources`-like reader for the task converters."""

    def __init__(self, records: dict[str, dict]):
        self.records = records

    @property
    def ids(self) -> list[str]:
        return list(self.records)

    def load(self, image_id: str) -> dict:
        return self.records[image_id]


def task_images(seed: int, feature_dim: int, world: WorldOptions, first: int, train_images: int, val_images: int,
                what: str):
    """(split, record) of a toy task's images: `train_images` from index `first` on, then
    `val_images`, new to any toy pretraining (which uses indices below 1,000,000)."""
    from tqdm import tqdm

    images_of = ToyWorld(seed, feature_dim, world)
    for split, (start, count) in {"train": (first, train_images), "val": (first + train_images, val_images)}.items():
        for record in tqdm(images_of.generate(start, count), total=count, desc=f"{what} {split} images", unit="img"):
            yield split, record


# --- writing shard sets ---------------------------------------------------------------
# Shards are independent (image i depends on (seed, i) only), so each worker process
# generates and writes whole shards: the output is the same for any number of workers.
_WORLD: ToyWorld | None = None


def _init_worker(seed: int, feature_dim: int, world: WorldOptions, threads: int | None = None) -> None:
    global _WORLD
    if threads:
        import torch

        torch.set_num_threads(threads)
    _WORLD = ToyWorld(seed, feature_dim, world)


def _write_shard(task) -> ShardInfo:
    from shards.build import encode_record

    path, start, count, options = task
    shard = TarShard(path)
    for record in _WORLD.generate(start, count):
        shard.write(record["image_id"], encode_record(record, record["captions"], options, key=record["image_id"],
                                                      meta={"scene": record["scene"]}))
    return shard.close()


def write_toyworld(out, train_images: int, val_images: int, *, seed: int = 0, feature_dim: int = 2048,
                   options=None, workers: int = 1, world: WorldOptions | None = None) -> dict[str, ShardIndex]:
    """Generate and write `out/train` and `out/val` (disjoint images); returns their indexes."""
    import multiprocessing

    from tqdm import tqdm

    from shards.build import ShardOptions

    options = options or ShardOptions()
    per_shard, world = options.samples_per_shard, world or WorldOptions()
    _init_worker(seed, feature_dim, world)
    # spawn, not fork: a forked child of a process that already ran torch's thread pool can hang.
    pool = multiprocessing.get_context("spawn").Pool(workers, _init_worker, (seed, feature_dim, world, 1)) \
        if workers > 1 else None
    indexes = {}
    try:
        with all_or_nothing() as staged:  # in place only once every split is complete
            for split, (start, count) in {"train": (0, train_images), "val": (train_images, val_images)}.items():
                if count == 0:
                    continue
                staged.append(StagedDirectory(Path(out) / split))
                directory = staged[-1].path
                tasks = [(directory / shard_name(options.prefix, n), start + first, min(per_shard, count - first),
                          options) for n, first in enumerate(range(0, count, per_shard))]
                shards = []
                with tqdm(total=count, desc=f"toy world {split}", unit="img") as progress:
                    for info in (pool.imap(_write_shard, tasks) if pool else map(_write_shard, tasks)):
                        shards.append(info)
                        progress.update(info.samples)
                indexes[split] = ShardIndex(shards=shards, feature_dim=feature_dim, num_classes=_WORLD.num_classes,
                                            class_topk=min(options.class_topk, _WORLD.num_classes),
                                            feature_dtype=options.feature_dtype, max_regions=MAX_REGIONS,
                                            source=f"toyworld seed={seed} {world.describe()}",
                                            class_names=_WORLD.class_names)
                indexes[split].write(directory)
    finally:
        if pool:
            pool.close()
    return indexes
