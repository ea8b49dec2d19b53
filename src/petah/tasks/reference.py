"""The reference profile ``petah adapt`` writes into a package (``petah.packages.reference`` defines
it): the adapted model run once more over the training images (input statistics, features) and the
validation images (confidences, and for classification which answers were right)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from petah.backbones.features import multi_scale_features
from petah.packages.reference import build_reference, input_statistics, softmax_confidence

MAX_IMAGES = 2048  # a profile needs a sample, not the whole set


def model_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What a station's drift check compares: the pooled features a classification head reads, else
    the deepest feature map the head reads, averaged over positions (``petah.serve.engine`` gives
    the same from a task's graph)."""
    strides = getattr(model.head, "strides", None)
    if strides is None:
        return model.backbone(x)
    return multi_scale_features(model.backbone, x, (max(strides),))[0].mean((2, 3))


def _images(loader: DataLoader):
    seen = 0
    for batch in loader:
        images, targets = batch[0], batch[1]
        yield images, targets
        seen += len(images)
        if seen >= MAX_IMAGES:
            return


@torch.no_grad()
def reference_profile(kind, model: torch.nn.Module, train: DataLoader, val: DataLoader, preprocess,
                      metrics: dict) -> dict:
    """The manifest's ``reference`` field for an adapted ``model`` of task ``kind``."""
    model.eval()
    statistics, features = [], []
    for images, _ in _images(train):
        statistics.append(input_statistics(images.numpy(), preprocess.mean, preprocess.std))
        features.append(model_features(model, images).float().numpy())
    confidences, correct = [], []
    for images, targets in _images(val):
        outputs = model(images)
        if kind.kind == "classification":
            confidences.append(softmax_confidence(outputs.numpy()))
            correct.append((outputs.argmax(1) == targets).numpy())
        elif kind.kind == "segmentation":
            confidences.append(softmax_confidence(outputs.numpy()).mean((1, 2)))
        elif kind.kind == "detection":
            found = kind.detections(outputs, images.shape[-1], model.head)
            confidences.append(np.array([float(d["scores"].max()) if len(d["scores"]) else 0.0 for d in found]))
        else:  # anomaly: the score (the map's maximum)
            confidences.append(outputs.flatten(1).max(1).values.numpy())
    confidences = np.concatenate(confidences)
    if kind.kind == "classification":
        return build_reference(np.concatenate(statistics), np.concatenate(features), confidences, metric="accuracy",
                               value=metrics["accuracy"], estimator="atc", correct=np.concatenate(correct))
    metric, estimator = {"segmentation": ("pixel_accuracy", "doc"), "detection": ("mAP50", "none"),
                         "anomaly": ("image_auroc", "none")}[kind.kind]
    value = metrics.get("accuracy" if kind.kind == "segmentation" else metric)
    return build_reference(np.concatenate(statistics), np.concatenate(features), confidences, metric=metric,
                           value=float(value or 0.0), estimator=estimator)


__all__ = ["model_features", "reference_profile"]
