"""The drift check: reference profiles (built, read back, refused when malformed) and the scores a
station computes over a window, on synthetic shifts (table-driven)."""

import numpy as np
import pytest

from petah.errors import PetahError
from petah.packages.reference import INPUT_STATISTICS, Reference, atc_threshold, build_reference, input_statistics
from petah.serve.drift import DriftConfig, TaskWatch

RNG = np.random.default_rng(0)
STATS = RNG.normal(0.5, 0.05, (400, len(INPUT_STATISTICS)))
FEATURES = RNG.normal(0.0, 1.0, (400, 32))
CONFIDENCES = RNG.uniform(0.3, 1.0, 300)
CORRECT = RNG.uniform(0, 1, 300) < CONFIDENCES  # calibrated: right as often as it is confident


def reference(**overrides) -> dict:
    data = build_reference(STATS, FEATURES, CONFIDENCES, metric="accuracy", value=float(CORRECT.mean()),
                           estimator="atc", correct=CORRECT)
    for path, value in overrides.items():
        node = data
        *parents, last = path.split(".")
        for key in parents:
            node = node[key]
        node[last] = value
    return data


def test_atc_estimates_the_accuracy_it_was_fitted_on():
    threshold = atc_threshold(CONFIDENCES, CORRECT)
    assert np.mean(CONFIDENCES > threshold) == pytest.approx(CORRECT.mean(), abs=1 / len(CORRECT))
    assert Reference(reference()).estimate(CONFIDENCES) == pytest.approx(CORRECT.mean(), abs=1 / len(CORRECT))


@pytest.mark.parametrize("path, value, error", [
    ("version", 99, "not one this petah reads"),
    ("input.mean", [0.1] * 5, "malformed input mean"),
    ("input.std", ["x"] * 6, "malformed"),
    ("features.mean", [float("nan")] * 32, "malformed feature mean"),
    ("features.index", [-1] * 32, "malformed feature index"),
    ("confidence.estimator", "magic", "unknown estimator"),
    ("confidence", None, "malformed"),
], ids=["version", "input length", "input type", "nan", "index", "estimator", "missing"])
def test_a_malformed_reference_is_one_line(path, value, error):
    with pytest.raises(PetahError, match=error):
        Reference(reference(**{path: value}))


def test_input_statistics_see_brightness_contrast_and_blur():
    image = RNG.uniform(0, 1, (1, 3, 32, 32)).astype(np.float32)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    normalise = lambda x: (x - 0.5) / 0.25  # noqa: E731
    base = input_statistics(normalise(image), mean, std)[0]
    darker = input_statistics(normalise(image * 0.5), mean, std)[0]
    blurred = (image + np.roll(image, 1, -1) + np.roll(image, 1, -2) + np.roll(image, (1, 1), (-2, -1))) / 4
    soft = input_statistics(normalise(blurred), mean, std)[0]
    assert darker[0] == pytest.approx(base[0] / 2, rel=1e-4) and darker[1] == pytest.approx(base[1] / 2, rel=1e-4)
    assert soft[2] < base[2] / 2  # sharpness: the mean |Laplacian| falls with blur
    assert list(base[3:]) == pytest.approx(list(image.mean((2, 3))[0]), rel=1e-5)


def _shifted(n: int, stats=0.0, features=0.0, confidence=1.0):
    rng = np.random.default_rng(1)
    return (rng.normal(0.5, 0.05, (n, len(INPUT_STATISTICS))) + stats * 0.05,
            np.clip(rng.uniform(0.3, 1.0, n) * confidence, 0, 1), rng.normal(features, 1.0, (n, 32)))


@pytest.mark.parametrize("shift, state, score", [
    ({}, "ok", None),
    ({"stats": 2.0}, "drifting", "input_drift"),
    ({"features": 1.5}, "drifting", "feature_drift"),
    ({"confidence": 0.6}, "drifting", "estimated"),
    ({"stats": 0.3, "features": 0.3}, "ok", None),  # small moves stay under the thresholds
], ids=["none", "inputs", "features", "confidence", "small"])
def test_the_window_calls_a_shifted_task_drifting(shift, state, score):
    watch = TaskWatch(Reference(reference()), None, DriftConfig(window=200, min_images=50))
    statistics, confidences, features = _shifted(200, **shift)
    for i in range(0, 200, 10):
        watch.observe(statistics[i:i + 10], confidences[i:i + 10], features[i:i + 10])
    summary = watch.summary()
    assert summary["state"] == state, summary
    assert summary["alarms"] == (state == "drifting")
    if score == "estimated":
        assert summary["estimated"] < summary["reference"]["value"] - 10 and summary["estimate_reliable"]
    elif score is not None:
        assert summary[score] > 1.0
        assert summary["estimate_reliable"] is False  # confidences say little once the inputs moved


def test_a_task_without_a_reference_says_why_and_a_young_window_waits():
    assert TaskWatch(None, "no profile", DriftConfig()).summary()["state"] == "no reference"
    watch = TaskWatch(Reference(reference()), None, DriftConfig(window=100, min_images=50))
    statistics, confidences, features = _shifted(20, stats=5.0)
    watch.observe(statistics, confidences, features)
    assert watch.summary()["state"] == "warming up"


@pytest.mark.parametrize("kwargs, error", [
    ({"window": 10, "min_images": 50}, "--drift-window must be 0 or at least"),
    ({"input_threshold": 0}, "--drift-input-threshold must be a positive number"),
    ({"accuracy_drop": -1}, "--drift-accuracy-drop"),
])
def test_bad_drift_options_are_one_line(kwargs, error):
    with pytest.raises(PetahError, match=error):
        DriftConfig(**kwargs)
