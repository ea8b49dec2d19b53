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

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from petah.data.datasets import TrainingView, random_split
from petah.data.images import DEFAULT_INTENSITY, load_image
from petah.errors import PetahError

BOX_TOLERANCE = 1.0  # px a box may poke out of its image (rounding in exporters)


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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise PetahError(f"{path}: not a readable COCO JSON file ({exc})") from exc
    missing = [k for k in ("images", "annotations", "categories")
               if not isinstance(data, dict) or not isinstance(data.get(k), list)]
    if missing:
        raise PetahError(f"{path}: COCO JSON needs lists 'images', 'annotations' and 'categories' (missing: "
                         f"{', '.join(missing)})")
    return data


def _numbers(*values: float) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


def _image_path(json_path: Path, file_name: str) -> Path:
    for root in (json_path.parent, json_path.parent / "images"):
        if (root / file_name).is_file():
            return root / file_name
    return json_path.parent / file_name


def load_coco(json_path: str | Path, classes: list[str] | None = None, strict: bool = False,
              intensity: str = DEFAULT_INTENSITY) -> BoxedImages:
    json_path = Path(json_path)
    data = _read_json(json_path)
    try:
        categories = sorted(data["categories"], key=lambda c: int(c["id"]))
        index = {int(c["id"]): i for i, c in enumerate(categories)}
        names = [str(c["name"]) for c in categories]
        entries = {int(img["id"]): {**img, "width": float(img["width"]), "height": float(img["height"])}
                   for img in data["images"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise PetahError(f"{json_path}: malformed 'categories' or 'images' entry (each needs id, name / file_name, "
                         f"width, height): {exc!r}") from exc
    if classes is not None and names != classes:
        raise PetahError(f"{json_path}: categories {names[:4]}… differ from the training set's {classes[:4]}…")
    if not names:
        raise PetahError(f"{json_path}: no categories")
    per_image: dict = {i: [] for i in entries}
    problems: dict = {}  # image id (or None) -> first problem
    for n, ann in enumerate(data["annotations"]):
        try:
            image_id, category = int(ann["image_id"]), int(ann["category_id"])
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError) as exc:
            problems.setdefault(None, f"{json_path}: annotation #{n} is malformed ({exc!r})")
            continue
        if image_id not in entries:
            problems.setdefault(None, f"{json_path}: annotation #{n} names unknown image id {image_id}")
            continue
        entry = entries[image_id]
        where = f"{json_path}: annotation #{n} of {entry.get('file_name')}"
        if category not in index:
            problems.setdefault(image_id, f"{where}: unknown category id {category}")
        elif w <= 0 or h <= 0:
            problems.setdefault(image_id, f"{where}: box {_numbers(x, y, w, h)} has no area")
        elif (x < -BOX_TOLERANCE or y < -BOX_TOLERANCE
              or x + w > entry["width"] + BOX_TOLERANCE or y + h > entry["height"] + BOX_TOLERANCE):
            problems.setdefault(image_id, f"{where}: box {_numbers(x, y, w, h)} lies outside the "
                                          f"{entry['width']:g}x{entry['height']:g} image")
        else:
            per_image[image_id].append(([x, y, x + w, y + h], index[category]))
    if strict and problems:
        raise PetahError(next(iter(problems.values())))
    skipped = [problems[None]] if None in problems else []
    images, boxes, labels = [], [], []
    for image_id, entry in entries.items():
        if image_id in problems:
            skipped.append(problems[image_id])
            continue
        path = _image_path(json_path, str(entry.get("file_name")))
        try:
            if not path.is_file():
                raise PetahError(f"{json_path}: image file {path} is missing")
            image = load_image(path, intensity)
        except PetahError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            continue
        found = per_image[image_id]
        box = torch.tensor([b for b, _ in found], dtype=torch.float32).reshape(-1, 4)
        box[:, 0::2] = box[:, 0::2].clamp(0, image.shape[-1])
        box[:, 1::2] = box[:, 1::2].clamp(0, image.shape[-2])
        images.append(image)
        boxes.append(box)
        labels.append(torch.tensor([c for _, c in found], dtype=torch.long))
    if not images:
        raise PetahError(f"{json_path}: no usable images ({len(skipped)} skipped; first: "
                         f"{skipped[0] if skipped else '-'})")
    return BoxedImages(images, boxes, labels, names, str(json_path), skipped, intensity)


def coco_json(folder: Path) -> Path | None:
    for candidate in (folder / "annotations.json", folder / "instances.json"):
        if candidate.is_file():
            return candidate
    return None


def is_coco_folder(root: Path) -> bool:
    return root.suffix == ".json" or coco_json(root) is not None or coco_json(root / "train") is not None


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
