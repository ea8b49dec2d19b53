"""Data: image folders, built-in offline datasets, preprocessing and seeded augmentation."""

from __future__ import annotations

from pathlib import Path

from petah.data.builtin import BUILTIN, load_builtin
from petah.data.datasets import LabeledImages, TrainingView, load_folder_splits, load_image_folder
from petah.data.images import array_to_rgb, load_image, pil_to_rgb
from petah.data.transforms import Augment, Preprocess
from petah.errors import PetahError


def load_dataset(spec: str, val_split: float | None = None, seed: int = 0) -> tuple[LabeledImages, LabeledImages]:
    """``builtin:NAME`` (or a bare built-in name) or an image folder -> (train, val)."""
    name = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        train, val = load_builtin(name)
        if val_split is not None:  # a user-chosen split of the training part
            train, val = train.split(val_split, seed)
        return train, val
    if not Path(spec).exists():
        raise PetahError(f"dataset not found: {spec} (an image folder, or builtin:{'|'.join(BUILTIN)})")
    return load_folder_splits(spec, val_split, seed)


__all__ = [
    "BUILTIN", "Augment", "LabeledImages", "Preprocess", "TrainingView", "array_to_rgb",
    "load_builtin", "load_dataset", "load_folder_splits", "load_image", "load_image_folder", "pil_to_rgb",
]
