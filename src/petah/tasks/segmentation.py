"""Semantic segmentation: a light FPN head over the backbone's stride 4 / 8 / 16 / 32 features.

The head (1×1 laterals to ``width`` channels, top-down sum, one 3×3 conv + BN + ReLU, a 1×1
classifier at the finest stride — 4 where the backbone has it: thin defects such as scratches
are lost at stride 8 on small inputs, measured in the closing note of the dense-task work) is
~60 k parameters at width 64 on efficientformerv2_s0: it travels in every package, so it is kept
small. Logits are upsampled to the input size; the loss is cross-entropy with ignore index 255
(plus soft dice if asked); the metric is torchmetrics' ``MulticlassJaccardIndex(ignore_index=255)``
per class and its mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from petah.backbones.features import DENSE_STRIDES, feature_levels, level_indices, multi_scale_features
from petah.data.segmentation import IGNORE, SegmentationView
from petah.device import decode
from petah.files import atomic_write_image

HEAD_WIDTH = 64
SEG_STRIDES = (4,) + DENSE_STRIDES


class FPNSegHead(nn.Module):
    def __init__(self, in_channels: list[int], classes: int, width: int = HEAD_WIDTH,
                 strides: tuple[int, ...] = DENSE_STRIDES):
        super().__init__()
        self.in_channels, self.classes, self.width, self.strides = list(in_channels), classes, width, tuple(strides)
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(width, classes, 1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = self.laterals[-1](features[-1])
        for lateral, feature in zip(reversed(self.laterals[:-1]), reversed(features[:-1]), strict=True):
            x = lateral(feature) + F.interpolate(x, size=feature.shape[-2:], mode="bilinear", align_corners=False)
        return self.classifier(self.fuse(x))


class SegmentationModel(nn.Module):
    """Backbone features at the head's strides → head → logits (N, classes, H, W) at input size."""

    def __init__(self, backbone: nn.Module, head: FPNSegHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(multi_scale_features(self.backbone, x, self.head.strides))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft dice over the classes present, ignoring 255 pixels."""
    valid = (target != IGNORE).unsqueeze(1)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(target.clamp(max=logits.shape[1] - 1), logits.shape[1]).permute(0, 3, 1, 2) * valid
    inter = (probs * onehot).sum((0, 2, 3))
    total = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    return (1 - (2 * inter + 1) / (total + 1))[present].mean()


class Segmentation:
    kind = "segmentation"
    primary_metric = "mIoU"
    lora_plus = 16.0  # LoRA+ raised the demo's defects mIoU (docs/benchmarks.md, "LoRA+")
    default_budget = None  # the uniform plan: a dense head alone is about 2 % of the backbone
    first_run = None  # training defaults from the data's size (petah.api.default_training): not measured

    @staticmethod
    def head_for(backbone, classes: int) -> FPNSegHead:
        levels = feature_levels(backbone.model)
        have = {level["reduction"] for level in levels}
        strides = SEG_STRIDES if set(SEG_STRIDES) <= have else DENSE_STRIDES
        channels = [levels[i]["num_chs"] for i in level_indices(backbone.model, strides)]
        return FPNSegHead(channels, classes, HEAD_WIDTH, strides)

    @staticmethod
    def head_manifest(head: FPNSegHead) -> dict:
        return {"type": "fpn", "in_channels": head.in_channels, "width": head.width, "out_features": head.classes,
                "strides": list(head.strides)}

    @staticmethod
    def head_from_manifest(info: dict) -> FPNSegHead:
        return FPNSegHead([int(c) for c in info["in_channels"]], int(info["out_features"]), int(info["width"]),
                          tuple(int(s) for s in info["strides"]))

    @staticmethod
    def build_model(backbone: nn.Module, head: nn.Module) -> nn.Module:
        return SegmentationModel(backbone, head)

    @staticmethod
    def view(data, preprocess, augment=None, seed: int = 0) -> SegmentationView:
        return SegmentationView(data, preprocess, augment, seed)

    @staticmethod
    def loss(label_smoothing: float = 0.0, dice: bool = False, **_context):
        def loss_fn(logits, target):
            loss = F.cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=label_smoothing)
            return loss + dice_loss(logits, target) if dice else loss

        return loss_fn

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, loader, classes: list[str]) -> dict:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex  # slow to import

        n = len(classes)
        # classes absent from both predictions and targets have no IoU (nan), not 0: they leave the mean
        metrics = {"iou": MulticlassJaccardIndex(n, average=None, ignore_index=IGNORE, zero_division=float("nan")),
                   "accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE)}
        device = next(model.parameters()).device
        for metric in metrics.values():
            metric.to(device)
        model.eval()
        pixels, images = 0, 0
        for batch, target in loader:  # a rank's shard; compute() sums the states over ranks
            preds = model(batch.to(device)).argmax(1)
            target = target.to(device)
            for metric in metrics.values():
                metric.update(preds, target)
            pixels += int((target != IGNORE).sum())
            images += len(target)
        iou = metrics["iou"].compute()
        return {
            "mIoU": round(float(iou.nanmean()), 6) if not iou.isnan().all() else 0.0,
            "accuracy": round(float(metrics["accuracy"].compute()), 6),  # pixel accuracy
            "per_class_iou": {c: None if v.isnan() else round(float(v), 6) for c, v in zip(classes, iou, strict=True)},
            "classes": list(classes),
            "samples": images,
            "pixels": pixels,
        }

    @staticmethod
    def decode(logits: torch.Tensor, classes: list[str], top_k: int = 3, sizes: list[tuple[int, int]] | None = None,
               **_context) -> list[dict]:
        """Per image: the class-index mask at the image's own size and each class's pixel share
        (``petah.device.decode.segmentation``: one definition for every engine)."""
        rows = decode.segmentation(logits.detach().float().cpu().numpy(), classes, sizes)
        return [{**row, "mask": torch.from_numpy(row["mask"])} for row in rows]


def mask_image(mask: torch.Tensor):
    """A palette image of class indices (VOC style): ``petah.device.decode`` draws it."""
    return decode.mask_image(mask.numpy())


def mask_png(mask: torch.Tensor) -> bytes:
    return decode.mask_png(mask.numpy())


def save_mask(mask: torch.Tensor, path) -> None:
    atomic_write_image(mask_image(mask), path)


def save_overlay(image: torch.Tensor, mask: torch.Tensor, path, alpha: float = 0.5) -> None:
    """The image with predicted classes (not background) tinted in their palette colours."""
    from PIL import Image

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    index = mask.numpy().astype(np.int64)
    colours = decode.PALETTE[index % len(decode.PALETTE)].astype(np.float32)
    tint = (index > 0)[..., None]
    blended = np.where(tint, (1 - alpha) * rgb + alpha * colours, rgb)
    atomic_write_image(Image.fromarray(blended.clip(0, 255).astype(np.uint8)), path)
