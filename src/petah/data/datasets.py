"""Labelled image sets in memory, the image-folder layout, splits, and the training view."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from petah.data.images import DEFAULT_INTENSITY
from petah.data.transforms import Augment, Preprocess
from petah.errors import PetahError
from petah.imaging import class_folders, load_class_images


@dataclass
class LabeledImages:
    """Images as (3, H, W) uint8 tensors (sizes may differ), integer labels, class names."""

    images: list[torch.Tensor]
    labels: torch.Tensor
    classes: list[str]
    source: str = ""
    meta: dict = field(default_factory=dict)
    intensity: str = DEFAULT_INTENSITY  # how deep (16-bit) image files were brought to 8 bits; packages record it

    def __len__(self) -> int:
        return len(self.images)

    def label_digest(self) -> bytes:
        return self.labels.numpy().tobytes()

    def subset(self, indices: list[int] | torch.Tensor, source: str | None = None) -> LabeledImages:
        idx = [int(i) for i in indices]
        return LabeledImages([self.images[i] for i in idx], self.labels[idx], self.classes, source or self.source,
                             intensity=self.intensity)

    def split(self, val_fraction: float, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
        """Stratified split: every class keeps ~val_fraction of its images for validation."""
        if not 0.0 < val_fraction < 1.0:
            raise PetahError(f"--val-split must be between 0 and 1, got {val_fraction}")
        gen = torch.Generator().manual_seed(seed)
        train, val = [], []
        for c in range(len(self.classes)):
            members = torch.nonzero(self.labels == c).flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            n_val = int(math.floor(len(members) * val_fraction + 0.5)) if len(members) > 1 else 0
            val += members[:n_val].tolist()
            train += members[n_val:].tolist()
        return self.subset(sorted(train), f"{self.source}[train]"), self.subset(sorted(val), f"{self.source}[val]")


def random_split(data, val_fraction: float, seed: int = 0):
    """(train, val) parts of a dense set, ~val_fraction for validation (at least one image)."""
    if not 0.0 < val_fraction < 1.0:
        raise PetahError(f"--val-split must be between 0 and 1, got {val_fraction}")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(data) * val_fraction))
    return (data.subset(sorted(order[n_val:]), f"{data.source}[train]"),
            data.subset(sorted(order[:n_val]), f"{data.source}[val]"))


def load_image_folder(root: str | Path, classes: list[str] | None = None,
                      intensity: str = DEFAULT_INTENSITY) -> LabeledImages:
    """``root/<class>/<image>``; ``classes`` fixes the label order (for a val folder); ``intensity``: see
    ``petah.data.images``."""
    root = Path(root)
    if not root.is_dir():
        raise PetahError(f"image folder not found: {root}")
    dirs = class_folders(root)
    names = [d.name for d in dirs]
    if classes is None:
        classes = names
    elif set(names) - set(classes):
        raise PetahError(f"{root} has classes not in the training set: {sorted(set(names) - set(classes))}")
    if len(classes) < 2:
        raise PetahError(f"{root} needs at least two class folders, found {len(classes)}")
    arrays, labels = load_class_images(dirs, list(classes), intensity)
    images = [torch.from_numpy(array) for array in arrays]
    return LabeledImages(images, torch.tensor(labels, dtype=torch.long), list(classes), str(root), intensity=intensity)


def load_folder_splits(root: str | Path, val_split: float | None, seed: int,
                       intensity: str = DEFAULT_INTENSITY) -> tuple[LabeledImages, LabeledImages]:
    """``root/train`` + ``root/val`` when present, else one folder split by ``val_split``."""
    root = Path(root)
    if (root / "train").is_dir() and (root / "val").is_dir():
        train = load_image_folder(root / "train", intensity=intensity)
        return train, load_image_folder(root / "val", classes=train.classes, intensity=intensity)
    if val_split is None:
        raise PetahError(f"{root} has no train/ and val/ folders; pass --val-split (e.g. 0.2)")
    return load_image_folder(root, intensity=intensity).split(val_split, seed)


class TrainingView(Dataset):
    """Preprocessed (and, for training, augmented) samples; augmentation is seeded per sample.

    The random stream of sample i in epoch e depends only on (seed, e, i), so a resumed or a
    sharded run sees exactly the augmentations of an uninterrupted one.
    """

    def __init__(self, data: LabeledImages, preprocess: Preprocess, augment: Augment | None = None, seed: int = 0):
        self.data, self.preprocess, self.augment, self.seed = data, preprocess, augment, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def generator(self, index: int) -> torch.Generator:
        """The random stream of sample ``index`` in this epoch."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data.images[index]
        if self.augment is not None:
            image = self.augment(image, self.generator(index))
        return self.preprocess(image), self.data.labels[index]
