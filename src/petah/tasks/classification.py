"""Image classification: a linear head on pooled features, cross-entropy, torchmetrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from petah.device import decode


class ClassificationModel(nn.Module):
    """Backbone (pooled features, ``num_classes=0``) followed by the task's head."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class Classification:
    """The classification task kind: head builder, loss, metrics, decode."""

    kind = "classification"
    primary_metric = "accuracy"
    # LoRA+ ratio when --lora-plus is not given: 16 raised every bench and demo classification task
    # (docs/benchmarks.md, "LoRA+")
    lora_plus = 16.0
    # The plan when no option chose one (petah.api.default_plan): a 3 % budget beat the uniform rank-8
    # plan on the bench tasks by 2.1 points (6.4 SE) at 0.75x its bytes (docs/benchmarks.md, "recipe search")
    default_budget = "3%"
    first_run = None  # training defaults from the data's size (petah.api.default_training): none needed

    @staticmethod
    def build_head(num_features: int, num_classes: int) -> nn.Module:
        return nn.Linear(num_features, num_classes)

    @classmethod
    def head_for(cls, backbone, classes: int) -> nn.Module:
        return cls.build_head(backbone.num_features, classes)

    @staticmethod
    def head_manifest(head: nn.Linear) -> dict:
        return {"type": "linear", "in_features": head.in_features, "out_features": head.out_features}

    @classmethod
    def head_from_manifest(cls, info: dict) -> nn.Module:
        return cls.build_head(int(info["in_features"]), int(info["out_features"]))

    @staticmethod
    def view(data, preprocess, augment=None, seed: int = 0):
        from petah.data import TrainingView

        return TrainingView(data, preprocess, augment, seed)

    @staticmethod
    def build_model(backbone: nn.Module, head: nn.Module) -> nn.Module:
        return ClassificationModel(backbone, head)

    @staticmethod
    def loss(label_smoothing: float = 0.0, dice: bool = False, **_context):  # dice: segmentation only
        return lambda logits, targets: F.cross_entropy(logits, targets, label_smoothing=label_smoothing)

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, loader, classes: list[str]) -> dict:
        """Top-1 accuracy, per-class precision / recall and the confusion matrix."""
        # imported here: torchmetrics (and the scipy it loads) took ~1 s of every CLI start, predict's too
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassPrecision,
            MulticlassRecall,
        )

        n = len(classes)
        metrics = {
            "accuracy": MulticlassAccuracy(n, average="micro"),
            "precision": MulticlassPrecision(n, average=None, zero_division=0),
            "recall": MulticlassRecall(n, average=None, zero_division=0),
            "confusion": MulticlassConfusionMatrix(n),
        }
        device = next(model.parameters()).device
        for metric in metrics.values():
            metric.to(device)
        model.eval()
        for images, targets in loader:  # a rank's shard; compute() sums the states over ranks
            preds = model(images.to(device)).argmax(dim=1)
            targets = targets.to(device)
            for metric in metrics.values():
                metric.update(preds, targets)
        values = {k: m.compute() for k, m in metrics.items()}
        return {
            "accuracy": round(float(values["accuracy"]), 6),
            "per_class": {
                c: {"precision": round(float(p), 6), "recall": round(float(r), 6)}
                for c, p, r in zip(classes, values["precision"], values["recall"], strict=True)
            },
            "confusion_matrix": values["confusion"].tolist(),
            "classes": list(classes),
            "samples": int(values["confusion"].sum()),
        }

    @staticmethod
    def decode(logits: torch.Tensor, classes: list[str], top_k: int = 3, sizes=None, **_context) -> list[dict]:
        return decode.classification(logits.detach().float().cpu().numpy(), classes, top_k)


def plot_confusion(report: dict, path: str | Path, title: str = "") -> Path:
    """A confusion-matrix PNG a person can read (counts in cells, classes on the axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = torch.tensor(report["confusion_matrix"]).numpy()
    classes = report["classes"]
    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"accuracy {report['accuracy']:.3f}")
    top = matrix.max() if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
