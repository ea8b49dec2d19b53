"""The golden-set gate's scoring without torch: a candidate and the current version of a task run
through the device engine's graphs on the station's golden set, scored and timed. Classification
golden sets for now (accuracy, as ``petah eval`` computes it); the dense kinds' gate needs the full
install (mIoU / mAP are torchmetrics' there and are not yet written in numpy here)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.files import inside
from petah.imaging import Preprocess, class_folders, load_class_images

BATCH = 32
TIMING_BATCH = 8
TIMING_ROUNDS = 3


def alternating_seconds(runs: dict[str, Callable[[object], object]], batches: list) -> dict[str, float]:
    """Median time of a golden batch per version, each batch run by the versions back to back (the
    order alternating): a busy moment slows both sides of a pair. Whole passes timed one after the
    other differed up to 1.9x between identical versions on a busy machine. Returns the seconds of
    one pass (median x batches)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(TIMING_ROUNDS):
        for i, batch in enumerate(batches):
            for name in order if (round_ + i) % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                runs[name](batch)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) * len(batches) for name, values in times.items()}


def load_class_folder(root: Path, labels: list[str], intensity: str) -> tuple[list[np.ndarray], np.ndarray]:
    """``root/<class>/<image>`` with the task's labels (the rules of ``petah.data.load_image_folder``)."""
    dirs = class_folders(root)
    unknown = sorted({d.name for d in dirs} - set(labels))
    if unknown:
        raise PetahError(f"{root} has classes not in the task: {unknown}")
    images, targets = load_class_images(dirs, labels, intensity)
    return images, np.asarray(targets, dtype=np.int64)


def score_on_device(engine, packages: dict[str, Path], golden: str | Path) -> dict[str, tuple] | None:
    """Per version: (metric, value in points, seconds of one pass), or None when the device keeps
    no golden set for the task. ``engine``: the station's ``DeviceEngine`` (its backbone, threads, trust)."""
    tasks = {name: engine.prepare(path, f"gate-{name}") for name, path in packages.items()}
    first = next(iter(tasks.values()))
    root = inside(golden, first.manifest.task.name)
    if not root.is_dir():
        return None
    kind = first.manifest.task.kind
    if kind != "classification":
        raise PetahError(f"the golden-set gate of a {kind} task needs the full install (its metric is computed "
                         "with torchmetrics there); on a device install it scores classification tasks")
    data = {name: load_class_folder(root, t.manifest.labels, t.manifest.intensity) for name, t in tasks.items()}
    if not data[next(iter(tasks))][0]:
        raise PetahError(f"golden set {root} is empty")

    def batches(task, images: list[np.ndarray], size: int) -> list[np.ndarray]:
        preprocess: Preprocess = task.preprocess
        return [preprocess.array_batch(images[i:i + size]) for i in range(0, len(images), size)]

    runs = {name: (lambda batch, task=task: engine.outputs(task, batch)) for name, task in tasks.items()}
    seconds = alternating_seconds(runs, batches(first, data[next(iter(tasks))][0], TIMING_BATCH))
    scores = {}
    for name, task in tasks.items():
        images, targets = data[name]
        predicted = np.concatenate([engine.outputs(task, batch).argmax(1) for batch in batches(task, images, BATCH)])
        scores[name] = ("accuracy", 100 * float(np.mean(predicted == targets)), seconds[name])
    return scores


__all__ = ["alternating_seconds", "load_class_folder", "score_on_device"]
