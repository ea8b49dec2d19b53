"""Per task, what a station watches over a sliding window of the images it answers, against the
reference profile its package carries (``petah.packages.reference``): input drift (how far the
window's image statistics moved, in reference standard deviations), feature drift (the same over
the task's own features, where the engine gives them: the device engine), the confidence, and the
task's metric estimated without labels. A task is "drifting" when any of them passes its threshold
(options with measured defaults: docs/deploy.md, "Long-term operation")."""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

import numpy as np

from petah.errors import PetahError
from petah.options import option
from petah.packages.reference import FIELD, Reference

TREND_POINTS = 120  # points of each task's trend kept for the page


@dataclass
class DriftConfig:
    window: int = option(200, cli="--drift-window",
                         help="Images per task the drift check looks at (the latest ones); 0: no drift check.")
    min_images: int = option(50, cli="--drift-min-images",
                             help="Images a task must have answered before it can be called drifting.")
    input_threshold: float = option(1.0, cli="--drift-input-threshold",
                                    help="Input drift (how far the window's mean brightness, contrast, sharpness or "
                                         "colour moved, in the reference's standard deviations) that calls a task "
                                         "drifting.")
    feature_threshold: float = option(1.0, cli="--drift-feature-threshold",
                                      help="Feature drift (root mean square of the task's feature means' moves, in "
                                           "reference standard deviations) that calls a task drifting.")
    accuracy_drop: float = option(10.0, cli="--drift-accuracy-drop",
                                  help="Points the estimated accuracy may fall below the reference before the task "
                                       "is called drifting.")

    def __post_init__(self):
        if self.window < 0 or self.min_images < 1 or (self.window and self.min_images > self.window):
            raise PetahError(f"--drift-window must be 0 or at least --drift-min-images ({self.min_images}), "
                             f"got {self.window}")
        for label, value in (("--drift-input-threshold", self.input_threshold),
                             ("--drift-feature-threshold", self.feature_threshold),
                             ("--drift-accuracy-drop", self.accuracy_drop)):
            if not 0 < value < 1e6:
                raise PetahError(f"{label} must be a positive number, got {value}")


class TaskWatch:
    """One task's window and state (observed on the inference thread, read by requests: a lock)."""

    def __init__(self, reference: Reference | None, why: str | None, config: DriftConfig):
        self.reference, self.why, self.config = reference, why, config
        self.statistics: collections.deque = collections.deque(maxlen=config.window)
        self.features: collections.deque = collections.deque(maxlen=config.window)
        self.confidences: collections.deque = collections.deque(maxlen=config.window)
        self.images = 0
        self.alarms = 0
        self.drifting = False
        self.trend: collections.deque = collections.deque(maxlen=TREND_POINTS)
        self.scores: dict = {}
        self._lock = threading.Lock()

    def observe(self, statistics: np.ndarray, confidences: np.ndarray, features: np.ndarray | None) -> None:
        with self._lock:
            self.statistics.extend(statistics)
            self.confidences.extend(confidences)
            if features is not None and self.reference is not None:
                self.features.extend(np.asarray(features, np.float64)[:, self.reference.feature_index])
            self.images += len(statistics)
            if self.reference is not None:
                self._judge()

    def _judge(self) -> None:
        reference, config = self.reference, self.config
        shift = np.abs(np.mean(self.statistics, axis=0) - reference.input_mean) / reference.input_std
        scores = {"input_drift": round(float(shift.max()), 4)}
        if self.features:
            moved = (np.mean(self.features, axis=0) - reference.feature_mean) / reference.feature_std
            scores["feature_drift"] = round(float(np.sqrt(np.mean(moved ** 2))), 4)
        estimate = reference.estimate(np.asarray(self.confidences))
        moved = (scores["input_drift"] > config.input_threshold
                 or scores.get("feature_drift", 0.0) > config.feature_threshold)
        if estimate is not None:
            scores["estimated"] = round(100 * estimate, 2)
            # a confidence-based estimate holds while the inputs look like the reference's; under a
            # shift a model can grow confident and wrong (measured: blurred textures, 100 vs 35 true)
            scores["estimate_reliable"] = not moved
        scores["confidence"] = round(float(np.mean(self.confidences)), 4)
        drifting = len(self.statistics) >= config.min_images and (
            moved or (estimate is not None and 100 * (reference.metric_value - estimate) > config.accuracy_drop))
        if drifting and not self.drifting:
            self.alarms += 1
        self.drifting, self.scores = drifting, scores
        if not self.trend or self.images - self.trend[-1]["images"] >= max(1, config.window // 10):
            self.trend.append({"images": self.images, "time": round(time.time(), 1), **scores})

    def summary(self) -> dict:
        with self._lock:
            if self.reference is None:
                return {"state": "no reference", "why": self.why, "images": self.images}
            state = ("drifting" if self.drifting else
                     "ok" if len(self.statistics) >= self.config.min_images else "warming up")
            return {"state": state, "images": self.images, "window": len(self.statistics), "alarms": self.alarms,
                    **self.scores, "reference": {"metric": self.reference.metric,
                                                 "value": round(100 * self.reference.metric_value, 2),
                                                 "images": self.reference.images},
                    "trend": list(self.trend)}


class DriftMonitor:
    """Every task's watch; a task's window starts afresh with each version installed."""

    def __init__(self, config: DriftConfig):
        self.config = config
        self.watches: dict[str, TaskWatch] = {}

    @property
    def enabled(self) -> bool:
        return self.config.window > 0

    def watch(self, name: str, manifest) -> None:
        data = manifest.extra.get(FIELD)
        reference, why = None, None
        if data is None:
            why = "its package carries no reference profile (adapted before petah wrote one)"
        else:
            try:
                reference = Reference(data)
            except PetahError as exc:
                why = str(exc)
        self.watches[name] = TaskWatch(reference, why, self.config)

    def forget(self, name: str) -> None:
        self.watches.pop(name, None)

    def observe(self, name: str, statistics: np.ndarray, confidences: np.ndarray,
                features: np.ndarray | None) -> None:
        watch = self.watches.get(name)
        if watch is not None:
            watch.observe(statistics, confidences, features)

    def summary(self, name: str) -> dict:
        watch = self.watches.get(name)
        return {"state": "off"} if watch is None or not self.enabled else watch.summary()


def confidences(kind: str, rows: list[dict]) -> np.ndarray:
    """Each answer's confidence as the reference profile measured it (``petah.tasks.reference``)."""
    if kind == "detection":
        return np.array([max((box["score"] for box in row["boxes"]), default=0.0) for row in rows])
    if kind == "segmentation":
        return np.array([row["confidence"] for row in rows])
    return np.array([row["score"] for row in rows])  # classification: top-1 probability; anomaly: its score


__all__ = ["DriftConfig", "DriftMonitor", "TaskWatch", "confidences"]
