"""Helpers shared by the tests."""

import functools
import json
import os
from pathlib import Path

import torch
import yaml

from vilbert import ViLBERTConfig

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}  # for the training subprocesses


def train_config(tmp_path, toy_world, **sections) -> Path:
    """A training YAML for the tiny model on the toy world (8 steps, checkpoints every 3),
    logging to an MLflow store in tmp_path; `sections` update (or add) the config's sections.
    `toy_world`: any directory with train/ and val/ shard sets."""
    config = {"output_dir": str(tmp_path / "run"), "deepspeed": str(ROOT / "deepspeed_configs/zero1_fp32.json"),
              "model": {"preset": "tiny", "overrides": {"vocab_size": 30522}},
              "data": {"shards": str(toy_world / "train"), "batch_size": 8, "workers": 0, "shuffle_buffer": 50},
              "eval": {"shards": str(toy_world / "val"), "max_batches": 2},
              "optim": {"steps": 8, "global_batch_size": 8, "lr": 1e-3},
              "checkpoint": {"every_steps": 3, "keep_last": 5},
              "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "test", "log_every": 1,
                           "system_metrics": False}}
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_ablation(tmp_path, toy_world, steps: int = 4, **spec) -> Path:
    """An ablation file of the tiny model: pretraining on `toy_world`, fine-tuning on a small
    toy VQA set written beside it, `steps` steps each, into an MLflow store in tmp_path;
    by default a 2 x 2 grid (model.arch x data.fraction 0 / 1.0); `spec` replaces its keys."""
    from shards.toyvqa import write_toy_vqa

    if not (tmp_path / "toyvqa/train/index.json").exists():
        write_toy_vqa(tmp_path / "toyvqa", 120, 40, feature_dim=32)
    short = {"optim": {"steps": steps}, "checkpoint": {"every_steps": steps}, "eval": {"every_steps": steps}}
    for folder in ("pretrain", "finetune"):
        (tmp_path / folder).mkdir(exist_ok=True)
    pretrain = train_config(tmp_path / "pretrain", toy_world, **short)
    finetune = train_config(tmp_path / "finetune", tmp_path / "toyvqa", task={"name": "vqa", "max_question_tokens": 12},
                            **short)
    ablation = {"name": "tiny", "output_dir": str(tmp_path / "ablation"), "experiment": "tiny-ablation",
                "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "pretrain": {"config": str(pretrain)}, "tasks": {"vqa": {"config": str(finetune)}},
                "axes": {"model.arch": ["vilbert", "single_stream"], "data.fraction": [0, 1.0]}, **spec}
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump(ablation, sort_keys=False))
    return path


def tiny_run_config(output_dir, deepspeed_file: str, *, features: int, classes: int, micro: int, global_batch: int,
                    steps: int, overrides=()):
    """The config of an in-process `pretrain` of the tiny model on `synthetic_batch`es (fed
    through `data_factory`): no MLflow, one checkpoint at the end; `overrides` add to it."""
    from vilbert.train import load_config

    return load_config(None, [
        f"output_dir={output_dir}", f"deepspeed={ROOT / 'deepspeed_configs' / deepspeed_file}",
        "model.preset=tiny", "model.overrides.vocab_size=30522", f"model.overrides.v_feature_size={features}",
        f"model.overrides.v_target_size={classes}", f"data.batch_size={micro}",
        f"optim.global_batch_size={global_batch}", f"optim.steps={steps}", "optim.lr=1e-3", "tracking.enabled=false",
        f"checkpoint.every_steps={steps}", *overrides])


def make_inputs(config: ViLBERTConfig, batch=3, tokens=9, regions=6, generator_seed=0):
    """Random model inputs with some padding in both streams (the first sample unpadded)."""
    g = torch.Generator().manual_seed(generator_seed)
    input_ids = torch.randint(1, config.vocab_size, (batch, tokens), generator=g)
    attention_mask = torch.ones(batch, tokens, dtype=torch.long)
    region_mask = torch.ones(batch, regions, dtype=torch.long)
    for b in range(1, batch):
        attention_mask[b, tokens - 2 * b:] = 0
        region_mask[b, regions - b:] = 0
    return dict(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids), attention_mask=attention_mask,
                region_features=torch.randn(batch, regions, config.v_feature_size, generator=g),
                region_locations=torch.rand(batch, regions, 5, generator=g), region_mask=region_mask)


def write_sample_shards(directory, n_shards=4, per_shard=10, feature_dim=8, num_classes=5, seed=0,
                        captions_of=lambda image_id: [f"a photo of {image_id}", f"{image_id} again"]):
    """A small shard set of random, valid samples (image ids img0000, img0001, ...);
    `num_classes=0`: without detector class distributions."""
    import numpy as np

    from shards.build import ShardOptions, encode_record
    from shards.writer import ShardSetWriter

    rng = np.random.default_rng(seed)
    options = ShardOptions(class_topk=3)
    with ShardSetWriter(directory, max_samples=per_shard, feature_dim=feature_dim, num_classes=num_classes,
                        class_topk=3, max_regions=6, source="test") as writer:
        for i in range(n_shards * per_shard):
            n = int(rng.integers(2, 9))
            xy = rng.uniform(0, 50, (n, 2))
            record = dict(image_id=f"img{i:04d}", image_w=100, image_h=80,
                          features=rng.normal(size=(n, feature_dim)).astype(np.float32),
                          boxes=np.concatenate([xy, xy + 20], 1).astype(np.float32))
            if num_classes:
                record["cls_prob"] = rng.dirichlet(np.ones(num_classes), n).astype(np.float32)
            writer.write(record["image_id"], encode_record(record, captions_of(record["image_id"]), options,
                                                           key=record["image_id"]))
    return directory


@functools.lru_cache(maxsize=1)
def _caption_tokenizer():
    from vilbert.data import load_tokenizer
    from vilbert.data.tokenizer import CaptionTokenizer

    return CaptionTokenizer(load_tokenizer())


def synthetic_batch(batch_id: int, size: int, feature_dim: int, num_classes: int):
    """A pretraining Batch that depends on batch_id only (for comparing world sizes)."""
    import numpy as np

    from vilbert.data import Collator

    rng = np.random.default_rng(batch_id)
    words = ["red", "dog", "blue", "car", "small", "tree", "left", "of", "a", "the"]
    samples = []
    for i in range(size):
        n = int(rng.integers(3, 7))
        xy = rng.uniform(0, 50, (n, 2)).astype(np.float32)
        samples.append(dict(key=f"{batch_id}-{i}", image_id=str(i), alignment_label=int(rng.integers(2)),
                            caption=" ".join(rng.choice(words, int(rng.integers(8, 14)))), image_w=100, image_h=80,
                            features=rng.normal(size=(n, feature_dim)).astype(np.float16),
                            boxes=np.concatenate([xy, xy + 20], 1),
                            cls_index=np.argsort(rng.random((n, num_classes)))[:, :3].astype(np.uint16),
                            cls_prob=np.full((n, 3), 0.3, np.float16)))
    collator = Collator(_caption_tokenizer(), max_regions=6, num_classes=num_classes, class_topk=3, seed=batch_id)
    return collator(samples)


def flip_bytes(path):
    """Damage a file without changing its size: 64 bytes flipped, so only its digest sees it."""
    data = bytearray(path.read_bytes())
    for i in range(0, min(len(data), 64)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


class FakeEngine:
    """Writes checkpoint files as DeepSpeed would; `fail_after` files it dies (a crash mid-save)."""

    def __init__(self, fail_after=None):
        self.fail_after = fail_after

    def save_checkpoint(self, directory, tag, client_state, save_latest):
        for i in range(3):
            if self.fail_after is not None and i == self.fail_after:
                raise KeyboardInterrupt("killed during save")
            (Path(directory) / tag).mkdir(parents=True, exist_ok=True)
            (Path(directory) / tag / f"part{i}.pt").write_text(json.dumps(client_state))


def save_fake_checkpoint(directory, step, keep_last=2):
    from vilbert.train import checkpoint

    return checkpoint.save(FakeEngine(), directory, {"step": step}, keep_last=keep_last, is_main=True)


def latest_tag(directory):
    from vilbert.train import checkpoint

    return (Path(directory) / checkpoint.LATEST).read_text()


HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def write_hub_model(cache, name: str, model) -> Path:
    """`model` saved into a Hugging Face cache in the hub's layout, as `hf download NAME`
    leaves it (refs/main -> snapshots/<commit>); returns the snapshot directory."""
    repo = Path(cache) / ("models--" + name.replace("/", "--"))
    model.save_pretrained(repo / "snapshots" / HUB_COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs/main").write_text(HUB_COMMIT)
    return repo / "snapshots" / HUB_COMMIT
