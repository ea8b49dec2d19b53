"""Object detection: an anchor-free FCOS head on an FPN over the adapted backbone's stride 8 / 16 / 32 features.

Built from torchvision's detection parts, not rewritten: ``FeaturePyramidNetwork``, ``FCOSHead``
(towers, box coder, focal / GIoU / centerness losses), and the ``FCOS`` model's target matching
(``compute_loss``) and post-processing (``postprocess_detections``: score threshold, top-k, box
decoding, ``batched_nms``), anchors from its ``AnchorGenerator``. Widths are light — every package
carries its head: 32-channel FPN and towers of 2 convs (torchvision's defaults, 256 channels and 4
convs, are ~4.7 M parameters, more than efficientformerv2_s0 itself).

The model's output is one tensor (N, locations, classes + 4 + 1): class logits, box regression and
centerness over all levels — what an ONNX export holds. Post-processing (decoding, NMS) stays
outside the graph and is done by ``decode``.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn as nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOS, FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork

from petah.backbones.features import DENSE_STRIDES, feature_levels, level_indices, multi_scale_features
from petah.data.detection import DetectionView
from petah.errors import PetahError
from petah.files import atomic_write_image

HEAD_WIDTH = 32  # torchvision's FCOS towers use GroupNorm(32, width)
TOWER_CONVS = 2
SCORE_THRESHOLD = 0.2


MAX_TOWER_CONVS = 16  # torchvision's FCOS uses 4; building thousands is only a way to stall a reader


@dataclass(frozen=True)
class FirstRun:
    """Training defaults a task kind takes from its data's size where the user set none
    (``petah.api.default_training``): epochs for at least ``min_steps`` optimizer steps (the
    usual 10 epochs at the least, ``max_epochs`` at the most) and the head's own rate."""

    min_steps: int
    max_epochs: int
    head_lr: float


class DetectionHead(nn.Module):
    def __init__(self, in_channels: list[int], classes: int, grids: list[int], width: int = HEAD_WIDTH,
                 convs: int = TOWER_CONVS, strides: tuple[int, ...] = DENSE_STRIDES):
        super().__init__()
        self.in_channels, self.classes, self.width, self.convs = list(in_channels), classes, width, convs
        self.strides = tuple(strides)
        # feature-map side per level (MobileViT v2 rounds maps up: not always ceil(size / stride))
        self.grids = list(grids)
        self.fpn = FeaturePyramidNetwork(self.in_channels, width)
        self.fcos = FCOSHead(width, num_anchors=1, num_classes=classes, num_convs=convs)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        maps = self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features)))
        out = self.fcos(list(maps.values()))
        return torch.cat([out["cls_logits"], out["bbox_regression"], out["bbox_ctrness"]], dim=2)


class DetectionModel(nn.Module):
    def __init__(self, backbone: nn.Module, head: DetectionHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(multi_scale_features(self.backbone, x, self.head.strides))


class _NoBackbone(nn.Module):
    """torchvision's FCOS wants a backbone; the engine below only borrows its loss and decoding."""

    out_channels = 1


@functools.lru_cache(maxsize=16)
def _engine(classes: int, strides: tuple[int, ...]) -> FCOS:
    anchors = AnchorGenerator(sizes=tuple((s,) for s in strides), aspect_ratios=((1.0,),) * len(strides))
    return FCOS(_NoBackbone(), classes, anchor_generator=anchors, head=FCOSHead(1, 1, classes, num_convs=0),
                score_thresh=SCORE_THRESHOLD, nms_thresh=0.6, detections_per_img=100, topk_candidates=1000).eval()


def _split(outputs: torch.Tensor, classes: int) -> dict[str, torch.Tensor]:
    return {"cls_logits": outputs[..., :classes], "bbox_regression": outputs[..., classes : classes + 4],
            "bbox_ctrness": outputs[..., classes + 4 :]}


def _anchors(outputs: torch.Tensor, img_size: int, head: DetectionHead) -> tuple[list[torch.Tensor], list[int]]:
    grids, strides = head.grids, head.strides
    per_level = [g * g for g in grids]
    if sum(per_level) != outputs.shape[1]:
        raise PetahError(f"{outputs.shape[1]} locations do not match the head's feature maps {grids} at {img_size} px")
    n = outputs.shape[0]
    images = ImageList(outputs.new_zeros(n, 1, img_size, img_size), [(img_size, img_size)] * n)
    maps = [outputs.new_zeros(n, 0, g, g) for g in grids]
    return _engine(outputs.shape[2] - 5, strides).anchor_generator(images, maps), per_level


class Detection:
    kind = "detection"
    primary_metric = "mAP50"
    lora_plus = 1.0  # plain LoRA: LoRA+ 16 lowered digit-boxes' mAP50 (docs/benchmarks.md, "LoRA+")
    default_budget = None  # the uniform plan: a dense head alone is about 2 % of the backbone
    # A first run must not underfit: on builtin:digit-boxes (384 images) 60 steps (10 epochs) scored
    # 0.150 mAP50, 180 steps 0.234, 300 steps 0.555 (docs/tasks.md, "Detection's first run")
    first_run = FirstRun(min_steps=300, max_epochs=50, head_lr=1e-2)

    @staticmethod
    def head_for(backbone, classes: int) -> DetectionHead:
        size = backbone.img_size
        with torch.no_grad():  # the real map sizes at this input size, once
            maps = multi_scale_features(backbone.model, torch.zeros(1, 3, size, size), DENSE_STRIDES)
        if min(m.shape[-1] for m in maps) < 2 or any(m.shape[-1] != m.shape[-2] for m in maps):
            # GroupNorm(32, 32) over a 1x1 map of one image has one value per group
            raise PetahError(f"detection needs an input of at least {2 * DENSE_STRIDES[-1]} px (the stride-32 level "
                             f"must be 2x2 or more); {backbone.name} runs at {size} px")
        levels = feature_levels(backbone.model)
        channels = [levels[i]["num_chs"] for i in level_indices(backbone.model, DENSE_STRIDES)]
        return DetectionHead(channels, classes, [m.shape[-1] for m in maps])

    @staticmethod
    def head_manifest(head: DetectionHead) -> dict:
        return {"type": "fcos", "in_channels": head.in_channels, "grids": head.grids, "width": head.width,
                "convs": head.convs, "out_features": head.classes, "strides": list(head.strides),
                "score_threshold": SCORE_THRESHOLD,
                "output_layout": "[N, locations, classes logits | 4 ltrb box regression | 1 centerness]"}

    @staticmethod
    def head_from_manifest(info: dict) -> DetectionHead:
        if not 0 <= int(info["convs"]) <= MAX_TOWER_CONVS:  # a package's description is untrusted input
            raise ValueError(f"convs must be 0..{MAX_TOWER_CONVS}, got {info['convs']}")
        return DetectionHead([int(c) for c in info["in_channels"]], int(info["out_features"]),
                             [int(g) for g in info["grids"]], int(info["width"]), int(info["convs"]),
                             tuple(int(s) for s in info["strides"]))

    @staticmethod
    def build_model(backbone: nn.Module, head: nn.Module) -> nn.Module:
        return DetectionModel(backbone, head)

    @staticmethod
    def view(data, preprocess, augment=None, seed: int = 0) -> DetectionView:
        return DetectionView(data, preprocess, augment, seed)

    @staticmethod
    def loss(label_smoothing: float = 0.0, dice: bool = False, *, head: DetectionHead, img_size: int):
        """FCOS's losses (focal classification + GIoU box + centerness BCE), summed."""
        def loss_fn(outputs: torch.Tensor, targets: list[dict]) -> torch.Tensor:
            anchors, per_level = _anchors(outputs, img_size, head)
            engine = _engine(outputs.shape[2] - 5, head.strides)
            losses = engine.compute_loss(targets, _split(outputs.float(), outputs.shape[2] - 5), anchors, per_level)
            return sum(losses.values())

        return loss_fn

    @staticmethod
    @torch.no_grad()
    def detections(outputs: torch.Tensor, img_size: int, head: DetectionHead) -> list[dict[str, torch.Tensor]]:
        """Boxes (xyxy, in input pixels), scores and labels per image: threshold, top-k, NMS."""
        classes, strides = outputs.shape[2] - 5, head.strides
        anchors, per_level = _anchors(outputs, img_size, head)
        parts = _split(outputs.float(), classes)
        by_level = {k: list(v.split(per_level, dim=1)) for k, v in parts.items()}
        split_anchors = [list(a.split(per_level)) for a in anchors]
        return _engine(classes, strides).postprocess_detections(by_level, split_anchors,
                                                                [(img_size, img_size)] * len(outputs))

    @staticmethod
    @torch.no_grad()
    def evaluate(model: nn.Module, loader, classes: list[str]) -> dict:
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
        device = next(model.parameters()).device
        model.eval()
        head = model.head
        images = 0
        for batch, targets in loader:
            found = Detection.detections(model(batch.to(device)), batch.shape[-1], head)
            metric.update([{k: v.cpu() for k, v in d.items()} for d in found], targets)
            images += len(batch)
        values = metric.compute()
        per_class = values.get("map_per_class")
        ids = values.get("classes")
        return {
            "mAP": round(float(values["map"]), 6),
            "mAP50": round(float(values["map_50"]), 6),
            "mAP75": round(float(values["map_75"]), 6),
            "per_class_ap": {classes[int(i)]: round(float(v), 6)
                             for i, v in zip(ids.flatten(), per_class.flatten(), strict=True)}
            if per_class is not None and per_class.numel() == ids.numel() else {},
            "accuracy": round(float(values["map_50"]), 6),  # the headline number where a single one is asked for
            "classes": list(classes),
            "samples": images,
        }

    @staticmethod
    @torch.no_grad()
    def decode(outputs: torch.Tensor, classes: list[str], top_k: int = 3, sizes=None,
               *, head: DetectionHead, img_size: int) -> list[dict]:
        """Per image: boxes in the image's own pixels (xyxy), label and score, best first."""
        rows = []
        for i, found in enumerate(Detection.detections(outputs, img_size, head)):
            h, w = sizes[i] if sizes is not None else (img_size, img_size)
            scale = torch.tensor([w / img_size, h / img_size, w / img_size, h / img_size])
            rows.append({"boxes": [
                {"label": classes[int(label)], "score": round(float(score), 6),
                 "box": [round(float(v), 2) for v in box * scale]}
                for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True)]})
        return rows


def save_box_overlay(image: torch.Tensor, boxes: list[dict], path) -> None:
    """The image with each detection drawn as a labelled rectangle."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image.permute(1, 2, 0).numpy()).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    for found in boxes:
        x0, y0, x1, y1 = found["box"]
        draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=max(1, round(min(canvas.size) / 100)))
        draw.text((x0 + 1, max(0, y0 - 10)), f"{found['label']} {found['score']:.2f}", fill=(255, 255, 0))
    atomic_write_image(canvas, path)
