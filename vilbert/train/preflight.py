"""Every check of a run that can fail before its first step, done before a job waits in a
queue (`launch/slurm.py`): a job that would fail on a compute node after hours in the queue
fails here instead, in one line."""

from __future__ import annotations

import dataclasses

from vilbert.train.config import TrainConfig, check_inputs, reconcile_batch_sizes


def check_run(config: TrainConfig, world_size: int, resume: str = "none", overwrite: bool = False) -> None:
    """Raises (ValueError, OSError) what would stop `config` on `world_size` ranks: missing
    files, shard sets without an index, shards that cannot feed the objective, batch sizes
    that do not divide, the task's inputs, an output directory that holds a run."""
    from vilbert.data.pipeline import shard_index
    from vilbert.train.run_dir import plan

    check_inputs(config)
    reconcile_batch_sizes(config, world_size)
    index = shard_index(config.data)
    if config.eval.shards:
        shard_index(dataclasses.replace(config.data, shards=config.eval.shards, index=""))
    if config.task:
        from vilbert.train.finetuning import make_task

        task = make_task(config, index)
        if config.eval.shards:
            task.check_split(shard_index(dataclasses.replace(config.data, shards=config.eval.shards, index="")),
                             config.eval.shards)
    else:
        from vilbert.train.pretraining import check_region_targets

        check_region_targets(config, index.num_classes, index.feature_dim)
    plan(config, resume, overwrite)
