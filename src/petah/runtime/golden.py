"""The golden-set gate's scoring on the full install: the torch task models on the golden set in
the task's usual format, with the metric ``petah eval`` reports (``petah.fleet.gate`` uses it for a
station on a torch backbone)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from petah.device.golden import BATCH, TIMING_BATCH, alternating_seconds
from petah.errors import PetahError
from petah.files import inside
from petah.runtime.attach import load_task
from petah.tasks import task_kind


def load_golden(folder: str | Path, task: str, labels: list[str], intensity: str, kind: str = "classification"):
    """The task's golden set, or None when the device keeps none for it."""
    from petah.data.anomaly import load_anomaly_folder
    from petah.data.datasets import load_image_folder
    from petah.data.detection import coco_json, is_coco_folder, load_coco
    from petah.data.segmentation import is_mask_folder, load_mask_folder

    root = inside(folder, task)
    if not root.is_dir():
        return None
    if kind == "anomaly":
        return load_anomaly_folder(root, intensity)
    if is_mask_folder(root):
        return load_mask_folder(root, labels, strict=True, intensity=intensity)
    if is_coco_folder(root):
        return load_coco(coco_json(root), labels, strict=True, intensity=intensity)
    return load_image_folder(root, classes=labels, intensity=intensity)


def _loader(task, data, batch_size: int) -> DataLoader:
    view = task_kind(task.manifest.task.kind).view(data, task.preprocess)
    return DataLoader(view, batch_size=batch_size, shuffle=False, collate_fn=getattr(view, "collate", None))


def _batch_seconds(tasks: dict, data) -> dict[str, tuple[float, float]]:
    batches = [batch[0] for batch in _loader(next(iter(tasks.values())), data, TIMING_BATCH)]  # images first
    with torch.inference_mode():
        return alternating_seconds({name: task.model for name, task in tasks.items()}, batches)


def score_with_torch(backbone, packages: dict[str, Path], golden: str | Path) -> dict[str, tuple] | None:
    """Each package scored on its task's golden set (None when there is none), and timed."""
    tasks = {name: load_task(backbone, path) for name, path in packages.items()}
    # each version reads the set with its own labels and intensity mode (a new version may add a class)
    data = {name: load_golden(golden, t.manifest.task.name, t.manifest.labels, t.manifest.intensity,
                              t.manifest.task.kind) for name, t in tasks.items()}
    first = next(iter(data.values()))
    if first is None:
        return None
    if len(first) == 0:
        raise PetahError(f"golden set {golden}/{next(iter(tasks.values())).manifest.task.name} is empty")
    seconds = _batch_seconds(tasks, first)
    scores = {}
    for name, task in tasks.items():
        kind = task_kind(task.manifest.task.kind)
        with torch.inference_mode():
            metrics = kind.evaluate(task.model, _loader(task, data[name], BATCH), data[name].classes)
        metric = kind.primary_metric
        if metrics[metric] is None:  # anomaly AUROC on a golden set of one class only: its accuracy at the threshold
            metric = "accuracy"
        scores[name] = (metric, 100 * float(metrics[metric]), *seconds[name])
    return scores


__all__ = ["load_golden", "score_with_torch"]
