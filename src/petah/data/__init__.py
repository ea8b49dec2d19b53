"""Data: image folders, built-in offline datasets, preprocessing and seeded augmentation."""

from __future__ import annotations

from pathlib import Path

from petah.data.anomaly import AnomalyImages, is_anomaly_folder, load_anomaly_splits
from petah.data.builtin import BUILTIN, load_builtin
from petah.data.datasets import LabeledImages, TrainingView, load_folder_splits, load_image_folder
from petah.data.detection import BoxedImages, is_coco_folder, load_coco_splits
from petah.data.images import (
    DEFAULT_INTENSITY,
    INTENSITY_MODES,
    MAX_IMAGE_PIXELS,
    array_to_rgb,
    check_intensity,
    load_image,
    pil_to_rgb,
)
from petah.data.segmentation import MaskedImages, is_mask_folder, load_mask_splits
from petah.data.transforms import Augment, Preprocess
from petah.errors import PetahError


def load_dataset(spec: str, val_split: float | None = None, seed: int = 0, strict: bool = False,
                 intensity: str = DEFAULT_INTENSITY, task: str | None = None) -> tuple:
    """``builtin:NAME`` (or a bare built-in name) or a folder -> (train, val).

    A folder of class sub-folders is a classification set (``LabeledImages``); one with
    ``images/`` + ``masks/`` (+ ``classes.txt``) a segmentation set (``MaskedImages``); a COCO JSON
    (or a folder with ``annotations.json``) a detection set (``BoxedImages``); MVTec AD's layout,
    or any folder when ``task`` is "anomaly", an anomaly set (``AnomalyImages``). Bad samples of the
    dense sets are skipped and counted unless ``strict``. ``intensity`` (dtype | range | percentile)
    says how images deeper than 8 bits become 8-bit (``petah.data.images``); the sets record it.
    """
    check_intensity(intensity)
    name = spec.removeprefix("builtin:")
    if spec.startswith("builtin:") or (name in BUILTIN and not Path(spec).exists()):
        train, val = load_builtin(name)
        if val_split is not None:  # a user-chosen split of the training part
            train, val = train.split(val_split, seed)
        train.intensity = val.intensity = intensity  # built-in images are 8-bit; the record is for later files
        return train, val
    if not Path(spec).exists():
        raise PetahError(f"dataset not found: {spec} (an image folder, or builtin:{'|'.join(BUILTIN)})")
    if task == "anomaly" or is_anomaly_folder(Path(spec)):
        return load_anomaly_splits(spec, val_split, seed, intensity)
    if is_mask_folder(Path(spec)):
        return load_mask_splits(spec, val_split, seed, strict, intensity)
    if is_coco_folder(Path(spec)):
        return load_coco_splits(spec, val_split, seed, strict, intensity)
    return load_folder_splits(spec, val_split, seed, intensity)


__all__ = ["AnomalyImages", "Augment", "BUILTIN", "BoxedImages", "DEFAULT_INTENSITY", "INTENSITY_MODES",
           "LabeledImages", "MAX_IMAGE_PIXELS", "MaskedImages", "Preprocess", "TrainingView", "array_to_rgb",
           "check_intensity", "load_builtin", "load_dataset", "load_folder_splits", "load_image",
           "load_image_folder", "pil_to_rgb"]
