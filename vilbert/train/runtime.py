"""Where a run computes: the process group, the device and the float type. Training and
`vilbert evaluate` set it up the same way, so a model is evaluated in the precision this
hardware trains it in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from vilbert.train.config import TrainConfig, deepspeed_config
from vilbert.train.distributed import DistEnv, init_distributed
from vilbert.train.precision import float_dtype, resolve_precision


@dataclass(frozen=True)
class Runtime:
    env: DistEnv  # who is who
    device_type: str  # "cuda" or "cpu"
    ds_config: dict  # the DeepSpeed file as this hardware runs it (bf16 resolved; training: batch sizes filled in)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.env.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return float_dtype(self.ds_config)

    @property
    def layout(self) -> dict:
        """What a checkpoint's files depend on (a resume must not change it)."""
        return {"zero_stage": self.ds_config.get("zero_optimization", {}).get("stage", 0),
                "precision": str(self.dtype).removeprefix("torch.")}


def start_runtime(config: TrainConfig, training: bool = True) -> Runtime:
    """The process group (collectives bounded by distributed.timeout_s) and the precision."""
    env, device_type = init_distributed(config.distributed.timeout_s)
    ds_config = deepspeed_config(config, env.world_size) if training else json.loads(Path(config.deepspeed).read_text())
    return Runtime(env, device_type, resolve_precision(ds_config, device_type, config.bf16_fallback))
