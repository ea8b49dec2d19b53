"""``petah bench drift``: the drift check measured on built-in tasks, one run, side by side.

Each task is adapted on the demo backbone (its package carries its reference profile), served by
the device engine in this process (one image per request, as a camera line sends them) and
watched by the station's drift check with its default settings. Measured per task:

* **false alarms**: alarms over ``unshifted`` requests of validation images drawn at random;
* per shift (brightness x0.5, Gaussian blur of radius 2 px, a new background: the image blended
  half-and-half with a photo the task never saw): the true accuracy on the shifted validation set
  (labels known here), the requests from the shift's start to the alarm (after a full window of
  unshifted requests), and the accuracy the station estimated without labels once its window holds
  only shifted images, beside the unshifted estimate and truth.

The loop, per task for the shifts in ``recover``: the station's capture store (default strategies)
watches a stream of ``stream`` shifted requests drawn from the task's *training* images (new parts
on the line: the validation images stay unseen), an operator confirms or corrects every capture
(here: the known label, through the store's review), ``export_captures`` writes them as class
folders, and the task is adapted again on its original training set plus the export. The new
version goes through the golden-set gate the fleet agent applies (device engine; the golden set:
the shifted validation images, as an operator would refresh it for the line as it now is) and is
scored on the shifted and the unshifted validation images: recovered = the share of the points
the shift cost that the new version wins back.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from petah.serve.drift import DriftConfig, DriftMonitor, confidences

SHIFTS = ("brightness x0.5", "blur radius 2", "new background")


def _photo(size: int) -> np.ndarray:
    """A photo none of the built-in tasks uses (scikit-image's coffee cup), at ``size`` px, CHW."""
    from skimage import data as photos

    image = Image.fromarray(photos.coffee()).resize((size, size), Image.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def shift_image(image: np.ndarray, shift: str) -> np.ndarray:
    """One (3, H, W) uint8 image under a shift."""
    if shift == "brightness x0.5":
        return (image.astype(np.float32) * 0.5).round().astype(np.uint8)
    if shift == "blur radius 2":
        blurred = Image.fromarray(image.transpose(1, 2, 0)).filter(ImageFilter.GaussianBlur(2))
        return np.asarray(blurred).transpose(2, 0, 1).copy()
    if shift == "new background":
        photo = _photo(image.shape[-1]).astype(np.float32)
        return (0.5 * image.astype(np.float32) + 0.5 * photo).round().astype(np.uint8)
    raise ValueError(shift)


class Served:
    """One task on the device engine with a drift check, fed one image per request."""

    def __init__(self, engine, name: str, config: DriftConfig):
        self.engine, self.name = engine, name
        self.task = engine.tasks[name]
        self.kind = self.task.manifest.task.kind
        self.monitor = DriftMonitor(config)
        self.reset()

    def reset(self) -> None:
        self.monitor.watch(self.name, self.task.manifest)

    def request(self, image: np.ndarray) -> dict:
        from petah.packages.reference import input_statistics

        rows = self.engine.run([image], [self.name], 1)[self.name]
        preprocess = self.task.preprocess
        statistics = input_statistics(preprocess.array_batch([image]), preprocess.mean, preprocess.std)
        self.monitor.observe(self.name, statistics, confidences(self.kind, rows), self.engine.features.get(self.name))
        return rows[0]

    @property
    def summary(self) -> dict:
        return self.monitor.summary(self.name)


def _accuracy(served: Served, images: list[np.ndarray], labels: list[str]) -> float:
    rows = [served.engine.run([image], [served.name], 1)[served.name][0] for image in images]
    return 100 * float(np.mean([row["label"] == label for row, label in zip(rows, labels, strict=True)]))


def measure_task(served: Served, images: list[np.ndarray], labels: list[str], unshifted: int, shifted: int,
                 seed: int) -> dict:
    rng = np.random.default_rng(seed)
    config = served.monitor.config
    served.reset()
    began = time.perf_counter()
    alarms_before = 0
    for _ in range(unshifted):
        served.request(images[rng.integers(len(images))])
    summary = served.summary
    alarms_before = summary.get("alarms", 0)
    seconds = time.perf_counter() - began
    row = {"unshifted_requests": unshifted, "false_alarms": alarms_before,
           "seconds_per_request_ms": round(1000 * seconds / max(1, unshifted), 3),
           "true_accuracy": round(_accuracy(served, images, labels), 2),
           "estimated_accuracy": summary.get("estimated"), "input_drift": summary.get("input_drift"),
           "feature_drift": summary.get("feature_drift"), "shifts": {}}
    for shift in SHIFTS:
        moved = [shift_image(image, shift) for image in images]
        served.reset()
        for _ in range(config.window):  # a full window of normal traffic first
            served.request(images[rng.integers(len(images))])
        to_alarm = None
        for n in range(1, shifted + 1):
            served.request(moved[rng.integers(len(moved))])
            if to_alarm is None and served.summary["state"] == "drifting":
                to_alarm = n
            if to_alarm is not None and n >= config.window:
                break
        summary = served.summary
        row["shifts"][shift] = {"true_accuracy": round(_accuracy(served, moved, labels), 2),
                                "requests_to_alarm": to_alarm, "estimated_accuracy": summary.get("estimated"),
                                "input_drift": summary.get("input_drift"),
                                "feature_drift": summary.get("feature_drift")}
    return row


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image.transpose(1, 2, 0)).save(buffer, format="PNG")
    return buffer.getvalue()


def capture_stream(served: Served, folder: Path, images: list[np.ndarray], labels: list[str], count: int,
                   warmup: list[np.ndarray], seed: int) -> dict:
    """Serve ``count`` requests drawn from ``images`` (after a window of ``warmup`` ones) with the
    station's capture store on, then review every capture with its true label (the operator)."""
    from petah.serve.capture import CaptureConfig, CaptureStore

    rng = np.random.default_rng(seed)
    store = CaptureStore(folder, CaptureConfig(capture_dir=str(folder)), seed=seed)
    served.reset()
    for _ in range(served.monitor.config.window):
        served.request(warmup[rng.integers(len(warmup))])
    manifests = {served.name: served.task.manifest}
    truth = {}
    for _ in range(count):
        index = int(rng.integers(len(images)))
        row = served.request(images[index])
        drifting = {served.name} if served.summary["state"] == "drifting" else set()
        capture_id = store.keep(str(index), _png(images[index]), {served.name: row}, manifests, drifting)
        if capture_id is not None:
            truth[capture_id] = labels[index]
    wrong = 0
    for capture_id, label in truth.items():
        answered = store.entries[capture_id]["tasks"][served.name].get("label")
        wrong += answered != label
        store.review(capture_id, served.name, label=label)
    return {"requests": count, "captured": len(truth), "captured_wrong": wrong}


def recover(served: Served, package_path: Path, backbone, train, val, shift: str, workdir: Path, stream: int,
            epochs: int, seed: int, before: dict) -> dict:
    """Capture -> review -> export -> adapt on original + corrected captures -> gate -> score."""
    import torch

    from petah import api
    from petah.data.datasets import LabeledImages, load_image_folder
    from petah.device.golden import score_on_device
    from petah.fleet.gate import GateRule, Score
    from petah.serve.capture import export_captures
    from petah.train import TrainConfig

    name, engine = served.name, served.engine
    val_images = [image.numpy() for image in val.images]
    val_labels = [val.classes[int(i)] for i in val.labels]
    train_images = [image.numpy() for image in train.images]
    train_labels = [train.classes[int(i)] for i in train.labels]
    moved_train = [shift_image(image, shift) for image in train_images]
    moved_val = [shift_image(image, shift) for image in val_images]
    folder = workdir / f"capture-{name}-{shift.replace(' ', '-')}"
    row = capture_stream(served, folder, moved_train, train_labels, stream, train_images, seed)
    exported = workdir / f"export-{name}-{shift.replace(' ', '-')}"
    export_captures(folder, exported)
    extra = load_image_folder(exported / name, classes=train.classes)
    combined = LabeledImages(list(train.images) + list(extra.images), torch.cat([train.labels, extra.labels]),
                             train.classes, f"{train.source}+captures")
    began = time.perf_counter()
    package = workdir / f"{name}-{shift.replace(' ', '-')}.petah"
    # validated on the original validation split (its reference profile describes the line as it was)
    api.adapt(backbone, combined, val, config=TrainConfig(epochs=epochs, seed=seed), task_name=name, output=package)
    row["adapt_seconds"] = round(time.perf_counter() - began, 1)
    golden = workdir / f"golden-{name}-{shift.replace(' ', '-')}"
    for index, (image, label) in enumerate(zip(moved_val, val_labels, strict=True)):
        (golden / name / label).mkdir(parents=True, exist_ok=True)
        (golden / name / label / f"{index}.png").write_bytes(_png(image))
    scores = score_on_device(engine, {"current": package_path, "candidate": package}, golden)
    current, candidate = Score(*scores["current"]), Score(*scores["candidate"])
    verdict = GateRule().judge(candidate, current, None)
    engine.install(engine.prepare(package, f"{name}-readapted"))
    retrained = Served(engine, f"{name}-readapted", served.monitor.config)
    after = _accuracy(retrained, moved_val, val_labels)
    lost = before["true_accuracy"] - before["shifts"][shift]["true_accuracy"]
    row.update({"gate": "passed" if verdict is None else f"refused: {verdict}",
                "golden_current": round(current.value, 2), "golden_candidate": round(candidate.value, 2),
                "shifted_accuracy_before": before["shifts"][shift]["true_accuracy"],
                "shifted_accuracy_after": round(after, 2),
                "unshifted_accuracy_after": round(_accuracy(retrained, val_images, val_labels), 2),
                "recovered_share": round((after - before["shifts"][shift]["true_accuracy"]) / lost, 2)
                if lost > 0 else None})
    engine.unload(retrained.name)
    return row


def run_drift_bench(tasks: tuple[str, ...] = ("digits", "textures"), unshifted: int = 30_000, shifted: int = 1000,
                    epochs: int = 10, seed: int = 0, threads: int = 2, config: DriftConfig | None = None,
                    recover_shifts: tuple[str, ...] = ("new background",), stream: int = 1000) -> dict:
    from petah import api
    from petah.backbones import create_backbone, demo_backbone_path
    from petah.data import load_builtin
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine
    from petah.train import TrainConfig

    config = config or DriftConfig()
    backbone = create_backbone(weights=str(demo_backbone_path()))
    engine = DeviceEngine(demo_device_backbone(), threads)
    results = {}
    with tempfile.TemporaryDirectory(prefix="petah-bench-drift-") as tmp:
        for name in tasks:
            train, val = load_builtin(name)
            adapted = api.adapt(backbone, train, val, config=TrainConfig(epochs=epochs, seed=seed), task_name=name,
                                output=Path(tmp) / f"{name}.petah")
            engine.install(engine.prepare(Path(tmp) / f"{name}.petah", name))
            images = [image.numpy() for image in val.images]
            labels = [val.classes[int(i)] for i in val.labels]
            served = Served(engine, name, config)
            results[name] = {"adapt_accuracy": round(100 * adapted.metrics["accuracy"], 2),
                             **measure_task(served, images, labels, unshifted, shifted, seed)}
            results[name]["loop"] = {shift: recover(served, Path(tmp) / f"{name}.petah", backbone, train, val, shift,
                                                    Path(tmp), stream, epochs, seed, results[name])
                                     for shift in recover_shifts}
    return {"config": {"window": config.window, "min_images": config.min_images,
                       "input_threshold": config.input_threshold, "feature_threshold": config.feature_threshold,
                       "accuracy_drop": config.accuracy_drop},
            "epochs": epochs, "seed": seed, "threads": threads, "stream": stream, "tasks": results}


__all__ = ["SHIFTS", "run_drift_bench", "shift_image"]
