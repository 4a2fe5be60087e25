"""Pretraining engine: configuration, distributed setup, DeepSpeed loop, checkpoints, tracking."""

from vilbert.train.config import TrainConfig, load_config

__all__ = ["TrainConfig", "load_config", "pretrain"]


def pretrain(*args, **kwargs):
    """See `vilbert.train.loop.pretrain` (imported lazily: it pulls in DeepSpeed)."""
    from vilbert.train.loop import pretrain as run

    return run(*args, **kwargs)
