"""The golden-set gate: a candidate package must score as well as the version it replaces on a
small labelled set kept on the device, and not run much slower.

``GOLDEN/<task>/`` holds the set in the task's usual format: class sub-folders (classification),
``images/`` + ``masks/`` (segmentation), a COCO JSON (detection) or ``good/`` + ``<defect>/``
folders with optional ``ground_truth/`` masks (anomaly) — all of it is the set.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from petah.errors import PetahError
from petah.files import inside
from petah.runtime.attach import load_task
from petah.tasks import task_kind

BATCH = 32


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


@dataclass
class Score:
    metric: str
    value: float  # in points (accuracy x 100, mIoU x 100, mAP50 x 100)
    seconds: float  # one pass over the golden set, from the median time of a batch


TIMING_BATCH = 8
TIMING_ROUNDS = 3


def _loader(task, data, batch_size: int) -> DataLoader:
    view = task_kind(task.manifest.task.kind).view(data, task.preprocess)
    return DataLoader(view, batch_size=batch_size, shuffle=False, collate_fn=getattr(view, "collate", None))


def _batch_seconds(tasks: dict, data) -> dict[str, float]:
    """Median forward time of a golden batch per version, each batch run by the versions back to
    back (the order alternating): a busy moment slows both sides of a pair. Whole passes timed one
    after the other differed up to 1.9x between identical versions on a busy machine."""
    batches = [batch[0] for batch in _loader(next(iter(tasks.values())), data, TIMING_BATCH)]  # images first
    times: dict[str, list[float]] = {name: [] for name in tasks}
    order = list(tasks)
    with torch.inference_mode():
        for round_ in range(TIMING_ROUNDS):
            for i, images in enumerate(batches):
                for name in order if (round_ + i) % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    tasks[name].model(images)
                    times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * len(batches) for name, values in times.items()}


def score_versions(backbone, packages: dict[str, Path], golden: str | Path) -> dict[str, Score] | None:
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
        scores[name] = Score(metric, 100 * float(metrics[metric]), seconds[name])
    return scores


@dataclass
class GateRule:
    tolerance: float = 1.0  # points the candidate may score below the current version
    max_slowdown: float = 1.2  # candidate latency / current latency

    def judge(self, candidate: Score, current: Score | None, min_score: float | None) -> str | None:
        """None when the candidate passes, else the one-line reason it does not."""
        if not math.isfinite(candidate.value):
            return f"{candidate.metric} is not a number on the golden set"
        if current is None:
            if min_score is not None and candidate.value < min_score:
                return f"{candidate.metric} {candidate.value:.2f} is below the release's minimum {min_score:.2f}"
            return None
        if candidate.value < current.value - self.tolerance:
            return (f"{candidate.metric} {candidate.value:.2f} vs {current.value:.2f} of the current version "
                    f"(tolerance {self.tolerance:g} points)")
        if candidate.seconds > self.max_slowdown * current.seconds:
            return (f"{candidate.seconds / current.seconds:.2f}x the current version's time on the golden set "
                    f"(at most {self.max_slowdown:g}x)")
        return None


__all__ = ["GateRule", "Score", "load_golden", "score_versions"]
