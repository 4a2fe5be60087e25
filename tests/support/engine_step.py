"""Run by test_step.py in a process of its own: pretraining steps of the tiny model through
the DeepSpeed engine, recording

- "reads": every call that copies a tensor's value to the host (`item`, `tolist`, `float()`,
  `int()`, `bool()`) made by the engine's own code (vilbert/train, vilbert/modeling,
  vilbert/losses), grouped by the optimizer step it happened in, with log_every=3;
- "bf16": the losses (every step) of the same run with DeepSpeed's bf16 mode forced on
  (bf16_fallback=false), and the dtypes the model's weights and inputs had.

Writes {"reads": {step: [call sites]}, "logged_steps": [...], "fp32_losses": {step: loss},
"bf16": {"losses": [...], "grad_norms": [...], "dtypes": [...]}}."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from helpers import synthetic_batch, tiny_run_config  # noqa: E402
from vilbert import ViLBERTForPretraining  # noqa: E402
from vilbert.train import pretrain  # noqa: E402
from vilbert.train.step_metrics import StepMetrics  # noqa: E402
from vilbert.train.tracking import read_metrics  # noqa: E402

FEATURES, CLASSES, STEPS = 12, 7, 6
ENGINE_CODE = ("/vilbert/train/", "/vilbert/modeling/", "/vilbert/losses.py")
HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__")


def data_factory(rank, world_size, seed_offset):
    return (synthetic_batch(i, 4, FEATURES, CLASSES) for i in range(10_000))


def config(root: Path, name: str, deepspeed: str, *overrides):
    return tiny_run_config(root / name, deepspeed, features=FEATURES, classes=CLASSES, micro=4, global_batch=8,
                           steps=STEPS, overrides=overrides)


def record_host_reads():
    """Patch the tensor methods that read a value to the host; returns {step: [sites]}."""
    reads, step = {}, [0]

    def spy(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if any(part in caller.co_filename for part in ENGINE_CODE):
                site = f"{Path(caller.co_filename).name}:{caller.co_name}:{sys._getframe(1).f_lineno}"
                reads.setdefault(step[0], []).append(site)
            return original(self, *args, **kwargs)
        setattr(torch.Tensor, name, read)

    for name in HOST_READS:
        spy(name)
    start_step = StepMetrics.start_step

    def counted_start(self):
        step[0] += 1
        start_step(self)
    StepMetrics.start_step = counted_start
    return reads


def main(out_path: str) -> None:
    root = Path(out_path).parent / "runs"
    bf16_config = config(root, "bf16", "zero0_bf16.json", "bf16_fallback=false", "tracking.log_every=1")
    dtypes, forward = set(), ViLBERTForPretraining.forward

    def recorded_forward(self, *args, **kwargs):
        dtypes.update(str(t.dtype) for t in (next(self.parameters()), kwargs["region_features"]))
        return forward(self, *args, **kwargs)
    ViLBERTForPretraining.forward = recorded_forward
    pretrain(bf16_config, data_factory=data_factory)
    ViLBERTForPretraining.forward = forward
    logged = [m for m in read_metrics(root / "bf16") if "train/loss" in m]
    bf16 = {"losses": [m["train/loss"] for m in logged], "grad_norms": [m["train/grad_norm"] for m in logged],
            "dtypes": sorted(dtypes)}

    reads = record_host_reads()
    pretrain(config(root, "fp32", "zero0_fp32.json", "tracking.log_every=3"), data_factory=data_factory)
    logged = {m["step"]: m["train/loss"] for m in read_metrics(root / "fp32") if "train/loss" in m}
    Path(out_path).write_text(json.dumps({"reads": reads, "logged_steps": list(logged), "fp32_losses": logged,
                                          "bf16": bf16}))


if __name__ == "__main__":
    main(sys.argv[1])
