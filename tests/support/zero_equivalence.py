"""Run by test_train.py, as one process or under torchrun with two: a few pretraining steps
under ZeRO 0-3 on batches that depend only on (step, micro batch) and not on the world
size, then the checkpoint-to-export check. Writes {stage: {"losses": [...], "export_diff": x}}."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import synthetic_batch, tiny_run_config  # noqa: E402
from vilbert import ViLBERTForPretraining  # noqa: E402
from vilbert.modeling.heads import PretrainingHeads  # noqa: E402
from vilbert.train import pretrain  # noqa: E402

GLOBAL_BATCH, MICRO, STEPS, FEATURES, CLASSES = 8, 4, 4, 12, 7


def _heads_without_dropout(init):
    """The official heads' fixed dropout off too: a rank's masks depend on how many micro batches
    it has drawn before, which differs between world sizes (the model's dropouts are overrides)."""
    def no_dropout(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.dropout.p = 0.0
    return no_dropout


PretrainingHeads.__init__ = _heads_without_dropout(PretrainingHeads.__init__)


def data_factory(rank, world_size, seed_offset):
    per_step = GLOBAL_BATCH // MICRO  # micro batches per optimizer step, all ranks together

    def batches():
        for step in range(10_000):
            for k in range(rank, per_step, world_size):  # rank r takes every world_size-th micro batch
                yield synthetic_batch(step * per_step + k, MICRO, FEATURES, CLASSES)
    return batches()


def engine_vs_export(config):
    """Load the final checkpoint into a fresh DeepSpeed engine and compare its outputs with the
    exported save_pretrained model (rank 0)."""
    import deepspeed
    import torch.distributed as dist

    from vilbert.model_factory import build_model
    from vilbert.train import checkpoint
    from vilbert.train.config import deepspeed_config
    from vilbert.train.optim import build_optimizer

    model, _ = build_model(config.model, "pretraining", {"v_feature_size": FEATURES, "v_target_size": CLASSES})
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, config.optim),
                                      config=deepspeed_config(config, dist.get_world_size()))
    checkpoint.load(engine, config.checkpoint_dir, checkpoint.resume_tag(config.checkpoint_dir, "auto"))
    engine.eval()
    batch = synthetic_batch(99_999, MICRO, FEATURES, CLASSES)
    with torch.no_grad():
        ours = engine(**batch.model_inputs())
    exported = ViLBERTForPretraining.from_pretrained(Path(config.output_dir) / "model").eval()
    with torch.no_grad():
        theirs = exported(**batch.model_inputs())
    return max((ours[k] - theirs[k]).abs().max().item() for k in ("loss", "alignment_logits", "region_logits"))


def main(out_path: str) -> None:
    root = Path(out_path).parent / "runs"  # shared by the ranks
    results = {}
    for stage in (0, 1, 2, 3):
        config = tiny_run_config(
            root / f"zero{stage}", f"zero{stage}_fp32.json", features=FEATURES, classes=CLASSES, micro=MICRO,
            global_batch=GLOBAL_BATCH, steps=STEPS, overrides=[
                "model.overrides.hidden_dropout_prob=0.0", "model.overrides.attention_probs_dropout_prob=0.0",
                "model.overrides.v_hidden_dropout_prob=0.0", "model.overrides.v_attention_probs_dropout_prob=0.0",
                "tracking.log_every=1"])
        pretrain(config, data_factory=data_factory)
        import torch.distributed as dist

        losses = [json.loads(line)["train/loss"] for line in (Path(config.output_dir) / "metrics.jsonl").open()] \
            if dist.get_rank() == 0 else []
        results[stage] = {"losses": losses, "export_diff": engine_vs_export(config)}
    if dist.get_rank() == 0:
        Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
