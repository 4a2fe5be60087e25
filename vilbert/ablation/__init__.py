"""Ablations: a grid of pretraining variants, each fine-tuned on the tasks, tracked as one
MLflow parent run with a child run per job, and compared in the paper's tables.

    spec.py     the ablation file: cells (explicit and/or the product of axes), tasks
    jobs.py     its jobs (a cell's pretraining, a cell's fine-tune on a task), their
                commands, dependencies and state
    parent.py   the parent MLflow run every job nests under
    local.py    `vilbert ablate`: the jobs one after another on this machine
    compare.py  `vilbert compare`: the tables and plots, from any tracking store
The SLURM sweep (`launch/slurm.py sweep`) submits the same jobs as job arrays.
"""
