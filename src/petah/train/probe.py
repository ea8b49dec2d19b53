"""The ``linear-probe`` plan of a classification task, fitted as linear probes are measured in the
field (CLIP's protocol): the frozen backbone's pooled features computed once, a multinomial
logistic regression fitted by L-BFGS (scikit-learn) on standardised features, its L2 strength
chosen on a held-out fifth of the training set and then refitted on all of it. The
standardisation is folded into the weights, so the package holds the same plain linear head as
before and every reader (device, ONNX, PEFT export) serves it unchanged.

Why not the training loop: it trained the head by AdamW for 10 epochs at the adapters' rate with
augmentation and label smoothing, and a probe fitted this way on the same features scored
points above it (the figures: docs/benchmarks.md, "The linear probe")."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from petah.train.trainer import TrainResult

STRENGTHS = (0.01, 0.1, 1.0, 10.0, 100.0)  # scikit-learn's C: the inverse of the L2 strength
HOLDOUT = 0.2
MAX_ITER = 1000
MIN_PER_CLASS = 2  # held-out images each class needs before the strength is chosen on them


@torch.no_grad()
def pooled_features(backbone: nn.Module, loader: DataLoader) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's pooled features (what the head sees) of every image, and their labels."""
    backbone.eval()
    features, labels = [], []
    for images, targets in loader:
        features.append(backbone(images).float().numpy())
        labels.append(np.asarray(targets))
    return np.concatenate(features).astype(np.float64), np.concatenate(labels)


def _logistic(features: np.ndarray, labels: np.ndarray, strength: float, seed: int):
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # not converged in MAX_ITER: the fit so far is still a fit (reported)
        warnings.simplefilter("ignore")
        return LogisticRegression(C=strength, max_iter=MAX_ITER, random_state=seed).fit(features, labels)


def _holdout(labels: np.ndarray, seed: int) -> np.ndarray | None:
    """A stratified fifth of the training images (a mask), or None where a class has too few."""
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        count = int(round(HOLDOUT * len(where)))
        if count < MIN_PER_CLASS or len(where) - count < 1:
            return None
        held[rng.choice(where, count, replace=False)] = True
    return held


def fit_linear_probe(backbone: nn.Module, head: nn.Linear, loader: DataLoader, classes: int,
                     seed: int) -> tuple[TrainResult, dict]:
    """Fit ``head`` (in place) as the probe; the result as the training loop reports one, and
    what the fit chose (the strength, each candidate's held-out accuracy, iterations)."""
    started = time.perf_counter()
    features, labels = pooled_features(backbone, loader)
    extracted = time.perf_counter() - started
    mean, std = features.mean(0), np.maximum(features.std(0), 1e-6)
    scaled = (features - mean) / std
    held = _holdout(labels, seed)
    scores = {}
    if held is not None and len(np.unique(labels[~held])) > 1:
        for strength in STRENGTHS:
            fitted = _logistic(scaled[~held], labels[~held], strength, seed)
            scores[strength] = float((fitted.predict(scaled[held]) == labels[held]).mean())
    strength = max(scores, key=lambda c: (scores[c], -abs(np.log10(c)))) if scores else 1.0  # ties: nearest 1
    weight = np.zeros((classes, features.shape[1]))
    bias = np.full(classes, -1e4)  # a class without training images is never predicted
    present = np.unique(labels)
    if len(present) == 1:
        bias[present[0]] = 0.0
        iterations, loss = 0, 0.0
    else:
        fitted = _logistic(scaled, labels, strength, seed)
        coef, intercept = fitted.coef_, fitted.intercept_
        if len(fitted.classes_) == 2:  # one logit difference: split it between the two classes
            coef, intercept = np.concatenate([-coef / 2, coef / 2]), np.concatenate([-intercept / 2, intercept / 2])
        weight[fitted.classes_], bias[fitted.classes_] = coef / std, intercept - (coef / std) @ mean
        iterations = int(np.max(fitted.n_iter_))
        probabilities = fitted.predict_proba(scaled)[np.arange(len(labels)), np.searchsorted(fitted.classes_, labels)]
        loss = float(-np.log(np.maximum(probabilities, 1e-12)).mean())
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(weight).to(head.weight.dtype))
        head.bias.copy_(torch.from_numpy(bias).to(head.bias.dtype))
    seconds = time.perf_counter() - started
    report = {"solver": "lbfgs", "strength": strength, "holdout_accuracy": {str(c): round(a, 4) for c, a in
                                                                            scores.items()},
              "iterations": iterations, "feature_seconds": round(extracted, 2)}
    return TrainResult(steps=iterations, epochs=1, seconds=seconds, last_loss=loss,
                       images_per_second=len(labels) / max(extracted, 1e-9)), report


__all__ = ["STRENGTHS", "fit_linear_probe", "pooled_features"]
