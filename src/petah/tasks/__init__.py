"""Task kinds: each supplies a head builder, loss, metrics and decode."""

from petah.errors import PetahError
from petah.tasks.classification import Classification, ClassificationModel, plot_confusion

TASK_KINDS = {Classification.kind: Classification}


def task_kind(name: str):
    if name not in TASK_KINDS:
        raise PetahError(f"unknown task kind {name!r}; known: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[name]


__all__ = ["Classification", "ClassificationModel", "TASK_KINDS", "plot_confusion", "task_kind"]
