"""Fine-tuning tasks, one module each. A module of this package that defines `TASK` (a
`vilbert.tasks.base.Task` subclass) is a task named after the module: adding one is adding
its file (and a config); nothing else needs to know about it."""

from __future__ import annotations

import importlib
import pkgutil

from vilbert.tasks.base import Task, TaskBatch

__all__ = ["Task", "TaskBatch", "available", "task_class"]


def available() -> list[str]:
    names = []
    for module in pkgutil.iter_modules(__path__):
        if hasattr(importlib.import_module(f"{__name__}.{module.name}"), "TASK"):
            names.append(module.name)
    return sorted(names)


def task_class(name: str) -> type[Task]:
    if not name.isidentifier() or name not in available():
        raise ValueError(f"unknown task {name!r}; the tasks are {available()} (vilbert/tasks/<name>.py)")
    return importlib.import_module(f"{__name__}.{name}").TASK
