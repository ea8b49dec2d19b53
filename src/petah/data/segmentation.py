"""Images with per-pixel class masks: the folder layout, bad-sample handling, the training view.

Folder layout (VOC-style, one folder per split or one folder split by ``--val-split``)::

    root/classes.txt          one class name per line, line i = class index i (or classes.json: a list)
    root/images/<stem>.png|jpg
    root/masks/<stem>.png     single-channel class indices (palette PNGs as VOC ships them); 255 = ignore

``root/train/`` + ``root/val/`` with that layout inside each is used when present.
A bad sample (missing or unreadable mask, a mask whose size differs from its image, a value
outside the classes) is an error naming the file with ``strict``; otherwise it is skipped and
counted in ``skipped``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from petah.data.datasets import TrainingView, random_split
from petah.data.images import DEFAULT_INTENSITY, IMAGE_SUFFIXES, load_image
from petah.errors import PetahError

IGNORE = 255


@dataclass
class MaskedImages:
    """Images as (3, H, W) uint8 tensors with (H, W) uint8 class-index masks; 255 = ignore."""

    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    classes: list[str]
    source: str = ""
    skipped: list[str] = field(default_factory=list)  # one message per bad sample left out
    intensity: str = DEFAULT_INTENSITY  # how deep (16-bit) image files were brought to 8 bits; packages record it

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices, source: str | None = None) -> MaskedImages:
        idx = [int(i) for i in indices]
        return MaskedImages([self.images[i] for i in idx], [self.masks[i] for i in idx], self.classes,
                            source or self.source, intensity=self.intensity)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[MaskedImages, MaskedImages]:
        return random_split(self, val_fraction, seed)

    def label_digest(self) -> bytes:
        return b"".join(m.numpy().tobytes() for m in self.masks)


def read_classes(root: Path) -> list[str]:
    for name in ("classes.txt", "classes.json"):
        path = root / name
        if path.is_file():
            try:
                text = path.read_text()
                classes = (json.loads(text) if name.endswith(".json")
                           else [line.strip() for line in text.splitlines() if line.strip()])
            except (OSError, ValueError) as exc:
                raise PetahError(f"{path}: cannot read the class names ({exc})") from exc
            if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
                raise PetahError(f"{path}: needs at least two class names")
            if len(classes) >= IGNORE:
                raise PetahError(f"{path}: at most {IGNORE} classes (mask value {IGNORE} means ignore)")
            return classes
    raise PetahError(f"{root} has no classes.txt (one class name per line) or classes.json")


def read_mask(path: Path) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as handle:
            if handle.mode == "1":  # a saved boolean array: 0 / 1
                handle = handle.convert("L").point(lambda v: 1 if v else 0)
            if handle.mode not in ("P", "L", "I", "I;16"):
                raise PetahError(f"{path}: a mask must be a single-channel PNG of class indices, got mode "
                                 f"{handle.mode}")
            array = np.array(handle)
    except (OSError, UnidentifiedImageError) as exc:
        raise PetahError(f"{path}: unreadable mask ({exc})") from exc
    return torch.from_numpy(array.astype(np.int64))


def _check_sample(image: torch.Tensor, mask: torch.Tensor, classes: int, mask_path: Path) -> torch.Tensor:
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise PetahError(f"{mask_path}: mask is {tuple(mask.shape)[::-1]} px but its image is "
                         f"{tuple(image.shape[-2:])[::-1]} px")
    bad = (mask >= classes) & (mask != IGNORE) | (mask < 0)
    if bad.any():
        raise PetahError(f"{mask_path}: mask value {int(mask[bad][0])} is not a class index (0..{classes - 1}) or "
                         f"{IGNORE}")
    return mask.to(torch.uint8)


def load_mask_folder(root: str | Path, classes: list[str] | None = None, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> MaskedImages:
    root = Path(root)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise PetahError(f"{root} needs images/ and masks/ folders (a segmentation dataset)")
    classes = classes or read_classes(root)
    files = sorted(p for p in (root / "images").iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise PetahError(f"{root / 'images'} holds no images")
    images, masks, skipped = [], [], []
    for file in files:
        mask_path = root / "masks" / f"{file.stem}.png"
        try:
            if not mask_path.is_file():
                raise PetahError(f"{file}: no mask {mask_path}")
            image = load_image(file, intensity)
            mask = _check_sample(image, read_mask(mask_path), len(classes), mask_path)
        except PetahError as exc:
            if strict:
                raise
            skipped.append(str(exc))
            continue
        images.append(image)
        masks.append(mask)
    if not images:
        raise PetahError(f"{root}: no usable samples ({len(skipped)} skipped; first: {skipped[0]})")
    return MaskedImages(images, masks, list(classes), str(root), skipped, intensity)


def load_mask_splits(root: str | Path, val_split: float | None, seed: int, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> tuple[MaskedImages, MaskedImages]:
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        at_top = any((root / n).is_file() for n in ("classes.txt", "classes.json"))
        classes = read_classes(root) if at_top else read_classes(root / "train")
        return (load_mask_folder(root / "train", classes, strict, intensity),
                load_mask_folder(root / "val", classes, strict, intensity))
    if val_split is None:
        raise PetahError(f"{root} has no train/ and val/ folders; pass --val-split (e.g. 0.2)")
    data = load_mask_folder(root, strict=strict, intensity=intensity)
    train, val = data.split(val_split, seed)
    train.skipped = val.skipped = data.skipped  # left out of both parts: each reports them
    return train, val


def is_mask_folder(root: Path) -> bool:
    """images/ + masks/ + a class list (a classification set may well have a class called "masks")."""
    def layout(folder: Path) -> bool:
        return (folder / "images").is_dir() and (folder / "masks").is_dir()

    def listed(folder: Path) -> bool:
        return any((folder / n).is_file() for n in ("classes.txt", "classes.json"))

    return (layout(root) and listed(root)) or (layout(root / "train") and (listed(root) or listed(root / "train")))


class SegmentationView(TrainingView):
    """(image, mask) pairs resized to the backbone's input; crops and flips hit both alike."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.data.images[index], self.data.masks[index]
        if self.augment is not None:
            image, mask = self.augment.pair(image, mask, self.generator(index))
        size = self.preprocess.img_size
        mask = TF.resize(mask[None], [size, size], interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
        return self.preprocess(image), mask.long()
