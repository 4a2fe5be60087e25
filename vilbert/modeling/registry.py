"""The model variants, by name (`model.arch`), and their classes per use.

A new variant (an encoder of its own, the same heads) is one entry here plus its file in
`vilbert/modeling/`; pretraining, fine-tuning, checkpoint export and `convert-official` all
find its classes through this table.
"""

from __future__ import annotations

from vilbert.modeling.single_stream import SingleStreamForPretraining, SingleStreamForTasks
from vilbert.modeling.vilbert import ViLBERTForPretraining, ViLBERTForTasks

PRETRAINING, TASKS = "pretraining", "tasks"  # what a class carries: the pretraining heads, or the task heads

ARCHITECTURES: dict[str, dict[str, type]] = {
    "vilbert": {PRETRAINING: ViLBERTForPretraining, TASKS: ViLBERTForTasks},  # the paper's two-stream model
    "single_stream": {PRETRAINING: SingleStreamForPretraining, TASKS: SingleStreamForTasks},  # the paper's
    #                                                                                          single-stream baseline
}


def model_class(arch: str, heads: str) -> type:
    """The class of `arch` with `heads`; ValueError naming what there is."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r} is not a model; choose from {sorted(ARCHITECTURES)}")
    if heads not in ARCHITECTURES[arch]:
        raise ValueError(f"model.arch={arch} has no {heads} model yet (it has: {', '.join(ARCHITECTURES[arch])})")
    return ARCHITECTURES[arch][heads]


def arch_of(class_name: str) -> str | None:
    """The `model.arch` a registered class belongs to (None: not one of ours)."""
    return next((arch for arch, variants in ARCHITECTURES.items()
                 if any(cls.__name__ == class_name for cls in variants.values())), None)


def class_named(name: str) -> type:
    """A registered class by its name (a checkpoint records its model's class name)."""
    classes = {cls.__name__: cls for variants in ARCHITECTURES.values() for cls in variants.values()}
    if name not in classes:
        raise ValueError(f"model class {name!r} is not one of {sorted(classes)}")
    return classes[name]
