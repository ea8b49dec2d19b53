"""The golden-set gate's scoring without torch: a candidate and the current version of a task run
through the device engine's graphs on the station's golden set, scored and timed. Every task kind,
with the metric and the number the full install's gate reports for the same package and set
(``petah.runtime.golden``: the task kinds' ``evaluate``): accuracy, mIoU, mAP50, image AUROC (its
accuracy at the head's threshold where the set holds one class only), in points.

The sets are read by ``petah.device.golden_data`` (the build side's loaders wrap the same arrays),
brought to the model's input as the task kinds' views bring them (images resized by the package's
preprocessing; masks nearest-exact to the input size; boxes scaled to it: predictions are compared
at the model's resolution), and scored by ``petah.device.metrics``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petah.device import decode, metrics
from petah.device.golden_data import GOOD, coco_json, is_mask_folder, read_anomaly_folder, read_coco, read_mask_folder
from petah.errors import PetahError
from petah.files import inside
from petah.imaging import class_folders, load_class_images, resize_nearest

BATCH = 32
TIMING_BATCH = 8
TIMING_ROUNDS = 3
DECIMALS = 6  # the task kinds' evaluate rounds its metrics to 6 decimals, before the gate makes points of them


def alternating_seconds(runs: dict[str, Callable[[object], object]], batches: list) -> dict[str, tuple[float, float]]:
    """Median time of a golden batch per version, each batch run by the versions back to back (the
    order alternating): a busy moment slows both sides of a pair. Whole passes timed one after the
    other differed up to 1.9x between identical versions on a busy machine. Returns per version the
    seconds of one pass (median x batches) and of one pass from each batch's fastest round (what
    the version costs without interference: other work on the device only adds time)."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(TIMING_ROUNDS):
        for i, batch in enumerate(batches):
            for name in order if (round_ + i) % 2 == 0 else order[::-1]:
                started = time.perf_counter()
                runs[name](batch)
                times[name].append(time.perf_counter() - started)
    count = len(batches)
    return {name: (statistics.median(values) * count, sum(min(values[i::count]) for i in range(count)))
            for name, values in times.items()}


def load_class_folder(root: Path, labels: list[str], intensity: str) -> tuple[list[np.ndarray], np.ndarray]:
    """``root/<class>/<image>`` with the task's labels (the rules of ``petah.data.load_image_folder``)."""
    dirs = class_folders(root)
    unknown = sorted({d.name for d in dirs} - set(labels))
    if unknown:
        raise PetahError(f"{root} has classes not in the task: {unknown}")
    images, targets = load_class_images(dirs, labels, intensity)
    return images, np.asarray(targets, dtype=np.int64)


@dataclass
class GoldenSet:
    """A golden set as one version reads it (with its labels and intensity mode)."""

    images: list[np.ndarray]  # (3, H, W) uint8
    targets: list | np.ndarray  # per image: class index, (H, W) mask, {"boxes", "labels"}, or anomalous (bool)


def load_golden_set(root: Path, kind: str, labels: list[str], intensity: str) -> GoldenSet:
    """``root`` in the layout of the task's kind (``petah.fleet.gate``'s doc lists them), strictly:
    a bad sample is an error naming it, as on the full install."""
    if kind == "anomaly":
        found = read_anomaly_folder(root, intensity)
        return GoldenSet(found.images, np.asarray([d != GOOD for d in found.defects], dtype=bool))
    if kind == "segmentation":
        if not is_mask_folder(root):
            raise PetahError(f"golden set {root}: a segmentation task's set is images/ + masks/ + classes.txt")
        masked = read_mask_folder(root, labels, strict=True, intensity=intensity)
        return GoldenSet(masked.images, masked.masks)
    if kind == "detection":
        path = coco_json(root)
        if path is None:
            raise PetahError(f"golden set {root}: a detection task's set is a COCO annotations.json with its images")
        boxed = read_coco(path, labels, strict=True, intensity=intensity)
        return GoldenSet(boxed.images, [{"boxes": b, "labels": y} for b, y in zip(boxed.boxes, boxed.labels,
                                                                                  strict=True)])
    images, targets = load_class_folder(root, labels, intensity)
    return GoldenSet(images, targets)


def _outputs(engine, task, images: list[np.ndarray]) -> Iterator[tuple[int, np.ndarray]]:
    """(index of the batch's first image, the task's raw output) per golden batch."""
    for start in range(0, len(images), BATCH):
        yield start, engine.outputs(task, task.preprocess.array_batch(images[start:start + BATCH]))


def _reported(value: float) -> float:
    """A metric as ``evaluate`` reports it (torchmetrics' float32 result, 6 decimals), in points."""
    return 100 * round(float(np.float32(value)), DECIMALS)


def _classification(engine, task, data: GoldenSet) -> tuple[str, float]:
    """Top-1 accuracy (``MulticlassAccuracy(average="micro")``: correct / all in float32)."""
    predicted = np.concatenate([outputs.argmax(1) for _, outputs in _outputs(engine, task, data.images)])
    correct = int(np.count_nonzero(predicted == np.asarray(data.targets)))
    return "accuracy", _reported(np.float32(correct) / np.float32(len(predicted)))


def _segmentation(engine, task, data: GoldenSet) -> tuple[str, float]:
    """mIoU of the answers' masks at the input size against the targets brought there nearest-exact
    (``SegmentationView``); the engine's own decoding makes the masks."""
    size, classes = task.preprocess.img_size, len(task.manifest.labels)
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for start, outputs in _outputs(engine, task, data.images):
        answers = engine.decode(task.manifest, outputs, [(size, size)] * len(outputs), 1)
        for answer, mask in zip(answers, data.targets[start:start + len(outputs)], strict=True):
            confusion += metrics.confusion_matrix(resize_nearest(mask, size, size), answer["mask"], classes)
    return "mIoU", _reported(metrics.mean_iou(confusion))


def _detection(engine, task, data: GoldenSet) -> tuple[str, float]:
    """mAP50 of the detections in the input's pixels (the FCOS decoding the engine answers with,
    before it scales and rounds boxes for the answer) against the boxes scaled to the input
    (``DetectionView``: float32, x by size / width, y by size / height)."""
    size, head = task.preprocess.img_size, task.manifest.head
    found = []
    for _, outputs in _outputs(engine, task, data.images):
        found += decode.fcos_detections(outputs, size, [int(g) for g in head["grids"]],
                                        [int(s) for s in head["strides"]], float(head.get("score_threshold", 0.2)))
    truth = []
    for image, target in zip(data.images, data.targets, strict=True):
        boxes = target["boxes"].copy()
        boxes[:, 0::2] *= np.float32(size / image.shape[-1])
        boxes[:, 1::2] *= np.float32(size / image.shape[-2])
        truth.append({"boxes": boxes, "labels": target["labels"]})
    return "mAP50", _reported(metrics.map50(found, truth))


def _anomaly(engine, task, data: GoldenSet) -> tuple[str, float]:
    """Image AUROC of the maps' maxima (unrounded: the engine's answers round the score); on a set
    of one class only, the accuracy of the decisions at the head's threshold."""
    scores = np.concatenate([outputs.reshape(len(outputs), -1).max(1)
                             for _, outputs in _outputs(engine, task, data.images)])
    anomalous = np.asarray(data.targets, dtype=bool)
    area = metrics.auroc(scores, anomalous)
    if area is not None:
        return "image_auroc", _reported(area)
    flagged = scores.astype(np.float64) > float(task.manifest.head["threshold"])  # as the torch side compares
    return "accuracy", 100 * round(float(np.mean(flagged == anomalous)), DECIMALS)


SCORERS = {"classification": _classification, "segmentation": _segmentation, "detection": _detection,
           "anomaly": _anomaly}


def score_on_device(engine, packages: dict[str, Path], golden: str | Path) -> dict[str, tuple] | None:
    """Per version: (metric, value in points, seconds of one pass, of one fastest pass), or None when the device keeps
    no golden set for the task. ``engine``: the station's ``DeviceEngine`` (its backbone, threads, trust)."""
    tasks = {name: engine.prepare(path, f"gate-{name}") for name, path in packages.items()}
    first = next(iter(tasks.values()))
    root = inside(golden, first.manifest.task.name)
    if not root.is_dir():
        return None
    kind = first.manifest.task.kind
    if kind not in SCORERS:
        raise PetahError(f"the golden-set gate cannot score a {kind} task")
    # each version reads the set with its own labels and intensity mode (a new version may add a class)
    data = {name: load_golden_set(root, kind, t.manifest.labels, t.manifest.intensity) for name, t in tasks.items()}
    first_images = data[next(iter(tasks))].images
    if not first_images:
        raise PetahError(f"golden set {root} is empty")
    timing = [first.preprocess.array_batch(first_images[i:i + TIMING_BATCH])
              for i in range(0, len(first_images), TIMING_BATCH)]
    runs = {name: (lambda batch, task=task: engine.outputs(task, batch)) for name, task in tasks.items()}
    seconds = alternating_seconds(runs, timing)
    return {name: (*SCORERS[kind](engine, task, data[name]), *seconds[name]) for name, task in tasks.items()}


__all__ = ["BATCH", "SCORERS", "TIMING_BATCH", "GoldenSet", "alternating_seconds", "load_class_folder",
           "load_golden_set", "score_on_device"]
