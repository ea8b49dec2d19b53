"""Anomaly data: good images to learn from, good and defective ones (with masks where known) to
choose the threshold and score on.

Two layouts, both read by ``load_anomaly_splits``:

- **MVTec AD**: ``train/good/``; ``test/good/``, ``test/<defect>/``; optional
  ``ground_truth/<defect>/<image stem>_mask.png`` (non-zero pixels are the defect);
- **plain folders**: ``train/`` of good images (directly, or in ``train/good/``); ``val/good/``
  and any other ``val/<name>/`` as anomalous (masks as MVTec's, under ``val/ground_truth/``).

Training never sees a defect: a ``train/`` sub-folder other than ``good/`` is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from petah.data.datasets import LabeledImages
from petah.data.images import DEFAULT_INTENSITY, IMAGE_SUFFIXES, load_image
from petah.data.segmentation import read_mask
from petah.data.transforms import Preprocess
from petah.errors import PetahError

GOOD = "good"
ANOMALY_CLASSES = ["good", "anomaly"]


@dataclass
class AnomalyImages(LabeledImages):
    """Images labelled 0 (good) or 1 (anomalous); per image its defect type ("good" for good ones)
    and its defect mask ((H, W) uint8, 1 = defect) where known — a good image's is all zeros."""

    masks: list[torch.Tensor | None] = field(default_factory=list)
    defects: list[str] = field(default_factory=list)

    def subset(self, indices, source: str | None = None) -> AnomalyImages:
        idx = [int(i) for i in indices]
        return AnomalyImages([self.images[i] for i in idx], self.labels[idx], list(self.classes),
                             source or self.source, intensity=self.intensity, masks=[self.masks[i] for i in idx],
                             defects=[self.defects[i] for i in idx])

    def good(self) -> AnomalyImages:
        return self.subset(torch.nonzero(self.labels == 0).flatten(), self.source)


def anomaly_set(images: list[torch.Tensor], defects: list[str], masks: list[torch.Tensor | None], source: str,
                intensity: str = DEFAULT_INTENSITY) -> AnomalyImages:
    labels = torch.tensor([int(d != GOOD) for d in defects], dtype=torch.long)
    return AnomalyImages(images, labels, list(ANOMALY_CLASSES), source, intensity=intensity, masks=masks,
                         defects=defects)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_defect_mask(path: Path, image: torch.Tensor) -> torch.Tensor:
    mask = read_mask(path)
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise PetahError(f"{path}: mask is {tuple(mask.shape)[::-1]} px but its image is "
                         f"{tuple(image.shape[-2:])[::-1]} px")
    return (mask > 0).to(torch.uint8)


def _load_part(folders: list[Path], ground_truth: Path | None, source: str, intensity: str) -> AnomalyImages:
    """Images of ``folders`` (a folder named ``good``: good; any other: its defect type), masks from
    ``ground_truth/<defect>/<stem>_mask.png`` where present."""
    images, defects, masks = [], [], []
    for folder in folders:
        defect = folder.name
        for file in _images_in(folder):
            image = load_image(file, intensity)
            mask = None
            if defect == GOOD:
                mask = torch.zeros(image.shape[-2:], dtype=torch.uint8)
            elif ground_truth is not None and (ground_truth / defect / f"{file.stem}_mask.png").is_file():
                mask = _read_defect_mask(ground_truth / defect / f"{file.stem}_mask.png", image)
            images.append(image)
            defects.append(defect)
            masks.append(mask)
        if ground_truth is not None and (ground_truth / defect).is_dir():
            stems = {f.stem for f in _images_in(folder)}
            orphans = [m.name for m in _images_in(ground_truth / defect) if m.stem.removesuffix("_mask") not in stems]
            if orphans:
                raise PetahError(f"{ground_truth / defect / orphans[0]}: a mask without an image in {folder}")
    return anomaly_set(images, defects, masks, source, intensity)


def load_anomaly_folder(root: str | Path, intensity: str = DEFAULT_INTENSITY, truth: Path | None = None,
                        source: str | None = None) -> AnomalyImages:
    """One held-out folder (a validation part, a device's golden set): ``good/`` and ``<defect>/``
    folders, masks from ``truth/<defect>/<stem>_mask.png`` (default: ``ground_truth/`` inside it)."""
    root = Path(root)
    folders = [f for f in _subfolders(root) if f.name != "ground_truth"]
    if not any(f.name == GOOD for f in folders):
        raise PetahError(f"{root}: needs a good/ folder (good images to set and check the threshold on)")
    truth = truth if truth is not None else root / "ground_truth"
    return _load_part(folders, truth if truth.is_dir() else None, source or str(root), intensity)


def is_anomaly_folder(root: Path) -> bool:
    """MVTec AD's layout: ``train/good/`` and nothing else under ``train/``, and a ``test/`` folder."""
    train = root / "train"
    return (train.is_dir() and (root / "test").is_dir() and (train / GOOD).is_dir()
            and [p.name for p in _subfolders(train)] == [GOOD])


def load_anomaly_splits(root: str | Path, val_split: float | None = None, seed: int = 0,
                        intensity: str = DEFAULT_INTENSITY) -> tuple[AnomalyImages, AnomalyImages]:
    """(train, val) of an anomaly folder (MVTec AD or plain layout, see the module's doc)."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise PetahError(f"{root}: an anomaly dataset needs train/ (good images only; MVTec AD: train/good/)")
    extra = [p.name for p in _subfolders(train_dir) if p.name != GOOD]
    if extra:
        raise PetahError(f"{train_dir / extra[0]}: train/ holds good images only (train/ or train/good/); put "
                         "defective images under test/ or val/")
    good_dir = train_dir / GOOD if (train_dir / GOOD).is_dir() else train_dir
    train = _load_part([good_dir], None, f"{root}[train]", intensity)
    if len(train) == 0:
        raise PetahError(f"{good_dir}: no good images to learn from")
    held_out = root / "test" if (root / "test").is_dir() else root / "val"
    if held_out.is_dir():
        truth = root / "ground_truth" if (root / "ground_truth").is_dir() else None  # MVTec AD keeps it beside test/
        val = load_anomaly_folder(held_out, intensity, truth, f"{root}[{held_out.name}]")
        if val_split is not None:
            raise PetahError(f"{root} has its own {held_out.name}/ part: leave out --val-split")
        return train, val
    if val_split is None:
        raise PetahError(f"{root} has no test/ or val/ folder: give --val-split to hold out good images")
    return train.split(val_split, seed)


class AnomalyView(Dataset):
    """Preprocessed images with their label and their mask at the input size (an empty tensor where
    unknown); never augmented: the bank holds what good parts look like."""

    def __init__(self, data: AnomalyImages, preprocess: Preprocess):
        self.data, self.preprocess = data, preprocess

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        mask = self.data.masks[index] if self.data.masks else None
        size = self.preprocess.img_size
        if mask is None:
            mask = torch.empty(0, dtype=torch.uint8)
        elif tuple(mask.shape) != (size, size):
            mask = F.interpolate(mask[None, None].float(), size=(size, size), mode="nearest")[0, 0].to(torch.uint8)
        return self.preprocess(self.data.images[index]), int(self.data.labels[index]), mask

    @staticmethod
    def collate(batch):
        images, labels, masks = zip(*batch, strict=True)
        return torch.stack(images), torch.tensor(labels), [m if m.numel() else None for m in masks]


__all__ = ["ANOMALY_CLASSES", "GOOD", "AnomalyImages", "AnomalyView", "anomaly_set", "is_anomaly_folder",
           "load_anomaly_folder", "load_anomaly_splits"]
