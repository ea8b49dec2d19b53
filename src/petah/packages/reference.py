"""A task's reference profile: what it saw at adapt time, so a station can tell when its inputs
drift and estimate its accuracy without labels (``petah.serve.drift``).

Stored in the manifest's ``reference`` field (JSON, covered by the content hash; a petah that
predates it keeps it as an unknown field). Defined here in numpy, so the build side writes and the
device side reads the same numbers:

* **input statistics** per image, on the image as the model sees it (resized to the backbone's
  size, before normalisation, values 0..1): brightness and contrast (mean and standard deviation
  of luminance), sharpness (mean absolute Laplacian of luminance: blur lowers it), and the mean of
  each colour channel;
* **features**: the adapted model's own features per image — the pooled features a
  classification head reads, or the deepest feature map a dense head reads averaged over
  positions — summarised as per-channel mean and standard deviation;
* **confidence** on the validation split: the model's confidence per image (top-1 probability;
  a dense task's mean per-pixel top probability; a detection's best box score; an anomaly score),
  its histogram, and what estimates the task's metric from confidences alone: for classification
  the ATC threshold (Garg et al., ICLR 2022: the confidence above which the share of validation
  images equals the validation accuracy), for segmentation the validation pixel accuracy and mean
  confidence (DoC, Guillory et al., ICCV 2021: the accuracy moves with the mean confidence).
"""

from __future__ import annotations

import json
import math

import numpy as np

from petah.errors import PetahError

REFERENCE_VERSION = 1
INPUT_STATISTICS = ("brightness", "contrast", "sharpness", "red", "green", "blue")
MAX_FEATURES = 128  # channels kept (the most varying): a reference stays a few KB
HISTOGRAM_BINS = 20
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def input_statistics(batch: np.ndarray, mean, std) -> np.ndarray:
    """(N, 6) statistics of a normalised (N, 3, H, W) batch (see the module's docstring)."""
    batch = np.asarray(batch, np.float32)
    pixels = batch * np.asarray(std, np.float32).reshape(1, 3, 1, 1) + np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    luma = np.tensordot(LUMA, pixels, axes=([0], [1]))  # (N, H, W)
    laplacian = (4 * luma[:, 1:-1, 1:-1] - luma[:, :-2, 1:-1] - luma[:, 2:, 1:-1] - luma[:, 1:-1, :-2]
                 - luma[:, 1:-1, 2:])
    return np.stack([luma.mean((1, 2)), luma.std((1, 2)), np.abs(laplacian).mean((1, 2)),
                     *pixels.mean((2, 3)).T], axis=1).astype(np.float32)


def softmax_confidence(logits: np.ndarray, axis: int = 1) -> np.ndarray:
    """The top probability along ``axis`` (classes)."""
    logits = np.asarray(logits, np.float32)
    shifted = logits - logits.max(axis=axis, keepdims=True)
    exp = np.exp(shifted)
    return 1.0 / exp.sum(axis=axis)  # exp(0) / sum: the top class's probability


def atc_threshold(confidences: np.ndarray, correct: np.ndarray) -> float:
    """The confidence above which the share of images equals the share answered correctly."""
    confidences = np.sort(np.asarray(confidences, np.float64))
    accuracy = float(np.mean(correct))
    below = int(round((1 - accuracy) * len(confidences)))  # that many images at or below the threshold
    if below <= 0:
        return float(confidences[0]) - 1e-6
    return float(confidences[below - 1])


def _floats(values, what: str, length: int | None = None) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or (length is not None and len(array) != length) or not np.all(np.isfinite(array)):
        raise PetahError(f"its reference profile has a malformed {what}")
    return array


def _rounded(values) -> list[float]:
    return [float(f"{float(v):.6g}") for v in values]


class Reference:
    """A task's reference profile (read from an untrusted manifest: checked on construction)."""

    def __init__(self, data: dict):
        if not isinstance(data, dict) or data.get("version") != REFERENCE_VERSION:
            raise PetahError("its reference profile is not one this petah reads")
        try:
            inputs, features, confidence = data["input"], data["features"], data["confidence"]
            self.images = int(data["images"])
            self.input_mean = _floats(inputs["mean"], "input mean", len(INPUT_STATISTICS))
            self.input_std = _floats(inputs["std"], "input spread", len(INPUT_STATISTICS))
            self.feature_index = np.asarray(features["index"], dtype=np.int64)
            self.feature_mean = _floats(features["mean"], "feature mean", len(self.feature_index))
            self.feature_std = _floats(features["std"], "feature spread", len(self.feature_index))
            self.metric = str(confidence["metric"])
            self.metric_value = float(confidence["value"])
            self.estimator = str(confidence["estimator"])
            self.threshold = float(confidence.get("threshold", math.nan))
            self.mean_confidence = float(confidence["mean"])
            self.histogram = _floats(confidence["histogram"], "confidence histogram", HISTOGRAM_BINS)
            self.confidence_range = _floats(confidence["range"], "confidence range", 2)
        except (KeyError, TypeError, ValueError) as exc:
            raise PetahError(f"its reference profile is malformed ({type(exc).__name__})") from None
        if self.feature_index.ndim != 1 or (self.feature_index < 0).any() or len(self.feature_index) > 4096:
            raise PetahError("its reference profile has a malformed feature index")
        if self.estimator not in ("atc", "doc", "none"):
            raise PetahError(f"its reference profile names an unknown estimator {self.estimator!r}")
        self.data = data

    def estimate(self, confidences: np.ndarray) -> float | None:
        """The metric estimated from a window of confidences (None where the kind has no estimator)."""
        if self.estimator == "atc":
            return float(np.mean(np.asarray(confidences) > self.threshold))
        if self.estimator == "doc":
            return float(np.clip(self.metric_value + np.mean(confidences) - self.mean_confidence, 0.0, 1.0))
        return None


def build_reference(statistics: np.ndarray, features: np.ndarray, confidences: np.ndarray, *, metric: str,
                    value: float, estimator: str, correct: np.ndarray | None = None) -> dict:
    """The manifest field from what the adapted model gave: input statistics and features of the
    training images, confidences (and, for ATC, which answers were right) on the validation split."""
    statistics, features = np.asarray(statistics, np.float64), np.asarray(features, np.float64)
    confidences = np.asarray(confidences, np.float64)
    spread = features.std(0)
    index = np.sort(np.argsort(-spread, kind="stable")[:MAX_FEATURES])
    low, high = float(confidences.min()), float(confidences.max())
    histogram, _ = np.histogram(confidences, bins=HISTOGRAM_BINS, range=(low, high if high > low else low + 1))
    confidence = {"metric": metric, "value": round(float(value), 6), "estimator": estimator,
                  "mean": round(float(confidences.mean()), 6), "range": _rounded([low, high]),
                  "histogram": _rounded(histogram / max(1, len(confidences)))}
    if estimator == "atc":
        confidence["threshold"] = float(f"{atc_threshold(confidences, correct):.6g}")
    return {"version": REFERENCE_VERSION, "images": int(len(statistics)),
            "input": {"names": list(INPUT_STATISTICS), "mean": _rounded(statistics.mean(0)),
                      "std": _rounded(np.maximum(statistics.std(0), 1e-6))},
            "features": {"index": [int(i) for i in index], "mean": _rounded(features.mean(0)[index]),
                         "std": _rounded(np.maximum(spread[index], 1e-6))},
            "confidence": confidence}


def _room() -> int:
    """Bytes a reference takes in a manifest at most (its numbers at their longest), so a byte
    budget can count it before training."""
    longest = -1.23456e-05
    worst = {"version": REFERENCE_VERSION, "images": 10**9,
             "input": {"names": list(INPUT_STATISTICS), "mean": [longest] * 6, "std": [longest] * 6},
             "features": {"index": [4095] * MAX_FEATURES, "mean": [longest] * MAX_FEATURES,
                          "std": [longest] * MAX_FEATURES},
             "confidence": {"metric": "pixel_accuracy", "value": 0.123456, "estimator": "none", "mean": 0.123456,
                            "range": [longest] * 2, "histogram": [longest] * HISTOGRAM_BINS, "threshold": longest}}
    return len(json.dumps({"reference": worst}, separators=(",", ":")))


REFERENCE_ROOM = _room()
FIELD = "reference"  # the manifest field


__all__ = ["FIELD", "HISTOGRAM_BINS", "INPUT_STATISTICS", "REFERENCE_ROOM", "REFERENCE_VERSION", "Reference",
           "atc_threshold", "build_reference", "input_statistics", "softmax_confidence"]
