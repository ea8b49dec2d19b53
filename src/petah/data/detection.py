"""Images with boxes: COCO-format JSON, bad-annotation handling, the training view.

A COCO dataset is ``annotations.json`` (``images`` with ``id`` / ``file_name`` / ``width`` /
``height``, ``annotations`` with ``image_id`` / ``category_id`` / ``bbox`` = [x, y, w, h] in
pixels, ``categories`` with ``id`` / ``name``) plus the image files, named relative to the
JSON's folder (or an ``images/`` folder beside it). Category ids map to class indices in id order.
An image with a bad annotation (a box outside the image or with no area, an unknown category or
image id) or a missing / unreadable file is an error naming the file with ``strict``; otherwise
the image is left out and counted in ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from petah.data.datasets import TrainingView, random_split
from petah.data.images import DEFAULT_INTENSITY
from petah.device import golden_data
from petah.device.golden_data import coco_json, is_coco_folder
from petah.errors import PetahError


@dataclass
class BoxedImages:
    """Images as (3, H, W) uint8 tensors with (K, 4) xyxy pixel boxes and (K,) class indices."""

    images: list[torch.Tensor]
    boxes: list[torch.Tensor]
    labels: list[torch.Tensor]
    classes: list[str]
    source: str = ""
    skipped: list[str] = field(default_factory=list)
    intensity: str = DEFAULT_INTENSITY  # how deep (16-bit) image files were brought to 8 bits; packages record it

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices, source: str | None = None) -> BoxedImages:
        idx = [int(i) for i in indices]
        return BoxedImages([self.images[i] for i in idx], [self.boxes[i] for i in idx], [self.labels[i] for i in idx],
                           self.classes, source or self.source, intensity=self.intensity)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[BoxedImages, BoxedImages]:
        return random_split(self, val_fraction, seed)

    def label_digest(self) -> bytes:
        return b"".join(b.numpy().tobytes() + y.numpy().tobytes() for b, y in zip(self.boxes, self.labels, strict=True))


def load_coco(json_path: str | Path, classes: list[str] | None = None, strict: bool = False,
              intensity: str = DEFAULT_INTENSITY) -> BoxedImages:
    """The set as ``petah.device.golden_data.read_coco`` reads it, as tensors."""
    found = golden_data.read_coco(json_path, classes, strict, intensity)
    return BoxedImages([torch.from_numpy(image) for image in found.images],
                       [torch.from_numpy(boxes) for boxes in found.boxes],
                       [torch.from_numpy(labels) for labels in found.labels], found.classes, str(Path(json_path)),
                       found.skipped, intensity)


def load_coco_splits(spec: str | Path, val_split: float | None, seed: int, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> tuple[BoxedImages, BoxedImages]:
    root = Path(spec)
    if root.is_dir() and coco_json(root / "train") and coco_json(root / "val"):
        train = load_coco(coco_json(root / "train"), strict=strict, intensity=intensity)
        return train, load_coco(coco_json(root / "val"), train.classes, strict, intensity)
    path = root if root.suffix == ".json" else coco_json(root)
    if path is None:
        raise PetahError(f"{root}: train/ holds a COCO set but val/ has none (annotations.json)")
    if val_split is None:
        raise PetahError(f"{spec} has no train/ and val/ COCO sets; pass --val-split (e.g. 0.2)")
    data = load_coco(path, strict=strict, intensity=intensity)
    train, val = data.split(val_split, seed)
    train.skipped = val.skipped = data.skipped  # left out of both parts: each reports them
    return train, val


def collate(batch):
    """Images stack; targets stay a list (their box counts differ)."""
    return torch.stack([x for x, _ in batch]), [t for _, t in batch]


class DetectionView(TrainingView):
    """(image, {"boxes", "labels"}) with boxes scaled to the backbone's square input; optional flip."""

    collate = staticmethod(collate)

    def __getitem__(self, index: int):
        image, boxes = self.data.images[index], self.data.boxes[index].clone()
        h, w = image.shape[-2:]
        size = self.preprocess.img_size
        boxes[:, 0::2] *= size / w
        boxes[:, 1::2] *= size / h
        x = self.preprocess(image)
        if self.augment is not None and self.augment.hflip:
            if float(torch.rand((), generator=self.generator(index))) < 0.5:
                x = TF.horizontal_flip(x)
                boxes[:, [0, 2]] = size - boxes[:, [2, 0]]
        return x, {"boxes": boxes, "labels": self.data.labels[index]}


__all__ = ["BoxedImages", "DetectionView", "coco_json", "collate", "is_coco_folder", "load_coco",
           "load_coco_splits"]
