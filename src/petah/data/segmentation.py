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

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF

from petah.data.datasets import TrainingView, random_split
from petah.data.images import DEFAULT_INTENSITY
from petah.device import golden_data
from petah.device.golden_data import CLASS_FILES, IGNORE, is_mask_folder, read_classes
from petah.errors import PetahError


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


def read_mask(path: Path) -> torch.Tensor:
    """A class-index mask PNG as an int64 tensor (``petah.device.golden_data.read_mask``)."""
    return torch.from_numpy(golden_data.read_mask(path))


def load_mask_folder(root: str | Path, classes: list[str] | None = None, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> MaskedImages:
    """The folder as ``petah.device.golden_data.read_mask_folder`` reads it, as tensors."""
    found = golden_data.read_mask_folder(root, classes, strict, intensity)
    return MaskedImages([torch.from_numpy(image) for image in found.images],
                        [torch.from_numpy(mask) for mask in found.masks], found.classes, str(Path(root)),
                        found.skipped, intensity)


def load_mask_splits(root: str | Path, val_split: float | None, seed: int, strict: bool = False,
                     intensity: str = DEFAULT_INTENSITY) -> tuple[MaskedImages, MaskedImages]:
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        at_top = any((root / n).is_file() for n in CLASS_FILES)
        classes = read_classes(root) if at_top else read_classes(root / "train")
        return (load_mask_folder(root / "train", classes, strict, intensity),
                load_mask_folder(root / "val", classes, strict, intensity))
    if val_split is None:
        raise PetahError(f"{root} has no train/ and val/ folders; pass --val-split (e.g. 0.2)")
    data = load_mask_folder(root, strict=strict, intensity=intensity)
    train, val = data.split(val_split, seed)
    train.skipped = val.skipped = data.skipped  # left out of both parts: each reports them
    return train, val


class SegmentationView(TrainingView):
    """(image, mask) pairs resized to the backbone's input; crops and flips hit both alike."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = self.data.images[index], self.data.masks[index]
        if self.augment is not None:
            image, mask = self.augment.pair(image, mask, self.generator(index))
        size = self.preprocess.img_size
        mask = TF.resize(mask[None], [size, size], interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
        return self.preprocess(image), mask.long()


__all__ = ["IGNORE", "MaskedImages", "SegmentationView", "is_mask_folder", "load_mask_folder", "load_mask_splits",
           "read_classes", "read_mask"]
