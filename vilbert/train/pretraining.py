"""What pretraining trains: `ViLBERTForPretraining` (or the single-stream baseline) on caption
shards, with masked multimodal modelling and alignment, evaluated on fixed held-out batches.

An objective tells the engine (`vilbert.train.loop`) what to build, what to feed, what to
minimise and how to evaluate; `vilbert.train.finetuning` is the other one.
"""

from __future__ import annotations

import dataclasses
import logging
from itertools import islice

import torch
import torch.distributed as dist

from vilbert.config_schema import ConfigError
from vilbert.train.config import TrainConfig
from vilbert.train.objective import Objective

log = logging.getLogger(__name__)

LOSSES = ("loss", "mlm_loss", "region_loss", "alignment_loss")
EVAL_SEED_OFFSET = -1  # the held-out batches' stream seed, apart from every training step's


def check_region_targets(config: TrainConfig, num_classes: int, feature_dim: int) -> None:
    """ConfigError when the masked-region objective asked for needs what the shards lack: the
    paper's KL target needs the detector's class distributions (`cls_prob`)."""
    from vilbert.config import VISUAL_TARGET_KL

    if num_classes == 0 and config.model.overrides.get("visual_target", VISUAL_TARGET_KL) == VISUAL_TARGET_KL:
        raise ConfigError(
            f"data.shards={config.data.shards} has no detector class distributions (cls_prob), which the paper's "
            f"masked-region objective (KL to the detector's classes) needs. Either write the shards from detector "
            f"output that has cls_prob, or regress the masked features instead: model.overrides.visual_target=1 "
            f"model.overrides.v_target_size={feature_dim}")


class PretrainingObjective(Objective):
    name = "pretraining"
    metric_names = (*LOSSES, "alignment_accuracy")
    best_metric = None  # the newest checkpoint is the model
    loaded_parameters: frozenset[str] = frozenset()  # state-dict names from model.bert (optim.fresh_lr: the rest)
    data_health = None  # the training stream's sample counts (vilbert.data.pipeline.DataHealth)
    probe_samples: list[dict] = []  # held-out toy-world images for vilbert.probes (eval.probe_images)

    def __init__(self, config: TrainConfig, env, data_factory=None):
        from vilbert.data.pipeline import shard_index

        self.config, self.env, self.data_factory = config, env, data_factory
        self.index = shard_index(config.data) if data_factory is None else None
        if self.index is not None:
            check_region_targets(config, self.index.num_classes, self.index.feature_dim)

    @property
    def examples_per_epoch(self) -> int:
        return self.index.num_samples

    @property
    def data_workers(self) -> int:  # processes that take cores from torch's threads
        return 0 if self.data_factory is not None else self.config.data.workers

    def build_model(self, device_type: str):
        from vilbert.model_factory import build_model
        from vilbert.modeling.registry import PRETRAINING

        shape = {"v_feature_size": self.index.feature_dim, "v_target_size": self.index.num_classes} \
            if self.index else {}  # a data factory (tests): model.overrides give them
        self.model, self.loaded_parameters = build_model(self.config.model, PRETRAINING, shape, device_type=device_type)
        return self.model

    def _loader(self, data_config, *, train: bool, seed_offset: int, rank: int, world_size: int):
        from vilbert.data import build_loader

        loader, _ = build_loader(data_config, train=train, rank=rank, world_size=world_size, seed_offset=seed_offset,
                                 visual_target=self.model.config.visual_target)
        return loader

    def train_batches(self, seed_offset: int):
        if self.data_factory is not None:
            return self.data_factory(self.env.rank, self.env.world_size, seed_offset)
        loader = self._loader(self.config.data, train=True, seed_offset=seed_offset, rank=self.env.rank,
                              world_size=self.env.world_size)
        self.data_health = loader.health
        return iter(loader)

    def held_out(self):
        """The held-out batches: the first `eval.max_batches` of one pass over the held-out
        shards, drawn once and kept (compact, on the host) so that every evaluation sees the
        same ones. Every rank draws the same batches (ZeRO-3 forwards are collective, and the
        figures do not depend on the world size); None without held-out shards. The probes'
        toy-world images are read here too, the same on every rank."""
        from vilbert.probes import RETRIEVAL_CANDIDATES, read_scenes

        ev = self.config.eval
        if not ev.shards:
            return None
        if ev.probe_images or ev.retrieval_queries:
            retrieval = max(ev.retrieval_queries, RETRIEVAL_CANDIDATES) if ev.retrieval_queries else 0
            self.probe_samples = read_scenes(ev.shards, max(ev.probe_images, retrieval))
        data = dataclasses.replace(self.config.data, shards=ev.shards, fraction=1.0)
        loader = self._loader(data, train=False, seed_offset=EVAL_SEED_OFFSET, rank=0, world_size=1)
        return list(islice(loader, ev.max_batches))

    def step(self, engine, batch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss to minimise and the step's metrics (`metric_names`, detached)."""
        out = engine(**batch.model_inputs(dtype))
        accuracy = (out.alignment_logits.detach().argmax(-1) == batch.alignment_labels).float().mean()
        return out.loss, torch.stack([*(out[name].detach().float() for name in LOSSES), accuracy])

    @torch.no_grad()
    def evaluate(self, engine, batches: list, dtype: torch.dtype) -> dict[str, float]:
        """Losses, masked-LM and alignment accuracy on the held-out batches; every rank must
        pass the same number of batches (ZeRO-3 forwards are collective)."""
        engine.eval()
        sums = torch.zeros(len(LOSSES) + 2, dtype=torch.float64, device=engine.device)  # + alignment, MLM hits
        samples, labelled_tokens = 0, 0  # counted on the host
        for batch in batches:  # the device sums are read once, after the last batch
            samples, labelled_tokens = samples + len(batch), labelled_tokens + len(batch.masked_lm_positions)
            batch = batch.to(engine.device)
            out = engine(**batch.model_inputs(dtype))
            labels = batch.masked_lm_labels.flatten()[batch.masked_lm_positions]
            hits = [(out.alignment_logits.argmax(-1) == batch.alignment_labels).sum(),
                    (out.masked_lm_logits.argmax(-1) == labels).sum()]
            sums += torch.stack([*(out[k].detach().double() for k in LOSSES), *(h.double() for h in hits)])
        totals = torch.cat([sums, torch.tensor([samples, labelled_tokens, len(batches)], dtype=torch.float64,
                                               device=engine.device)])
        if dist.is_initialized():
            dist.all_reduce(totals)
        engine.train()
        *losses, aligned, mlm_right, samples, mlm_total, batches_seen = totals.tolist()
        metrics = {f"val/{name}": value / batches_seen for name, value in zip(LOSSES, losses)}
        metrics["val/alignment_accuracy"] = aligned / samples
        metrics["val/mlm_accuracy"] = mlm_right / max(mlm_total, 1)
        if self.probe_samples:  # every rank runs the same forwards (ZeRO-3's are collective)
            from vilbert.probes import probe_model

            ev = self.config.eval
            probed = probe_model(engine, self.probe_samples[:ev.probe_images], retrieval_images=ev.retrieval_queries,
                                 retrieval_samples=self.probe_samples, tokenizer_path=self.config.data.tokenizer,
                                 max_regions=self.index.max_regions, dtype=dtype)
            metrics.update({f"val/{name}": value for name, value in probed.items()})
        return metrics
