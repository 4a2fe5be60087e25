"""Toy-world image retrieval: held-out toy-world images and their captions (3-5 each, the toy
world's own), written by the same converter as Flickr30k (`shards.retrieval`), with the
training set's hard negatives beside it. Images are new toy-world images (from
`RETRIEVAL_FIRST_IMAGE` on), never among those a toy pretraining saw; the splits are train
and val. A toy caption often fits several scenes ("there are two dogs."), so even a perfect
model's R@1 is below 1.
"""

from __future__ import annotations

from pathlib import Path

from shards.build import ShardOptions
from shards.retrieval import write_retrieval_sets
from shards.toyworld import GeneratedImages, WorldOptions, task_images

RETRIEVAL_FIRST_IMAGE = 4_000_000


def write_toy_retrieval(out: str | Path, train_images: int, val_images: int, *, seed: int = 0,
                        feature_dim: int = 2048, options: ShardOptions | None = None,
                        world: WorldOptions | None = None) -> dict[str, dict]:
    """Write `out/train` (with its hard negatives) and `out/val` toy retrieval shard sets
    (images of the toy world of `seed` with `world`'s options: give the ones of the world
    the model was pretrained on)."""
    world, options = world or WorldOptions(), options or ShardOptions(samples_per_shard=250)
    sets, images = {"train": [], "val": []}, {}
    for split, record in task_images(seed, feature_dim, world, RETRIEVAL_FIRST_IMAGE, train_images, val_images,
                                     "toy retrieval"):
        images[record["image_id"]] = record
        sets[split] += [{"image_id": record["image_id"], "sent_id": len(sets[split]) + i, "caption": caption}
                        for i, caption in enumerate(record["captions"])]
    return write_retrieval_sets(sets, GeneratedImages(images), out, options,
                                max_regions=max(len(r["boxes"]) for r in images.values()),
                                source_name=f"toyworld seed={seed} {world.describe()} images "
                                            f"{RETRIEVAL_FIRST_IMAGE}+")
