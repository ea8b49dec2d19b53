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
from petah.data.images import DEFAULT_INTENSITY
from petah.data.transforms import Preprocess
from petah.device import golden_data
from petah.device.golden_data import GOOD, is_anomaly_folder, subfolders
from petah.errors import PetahError

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


def _load_part(folders: list[Path], ground_truth: Path | None, source: str, intensity: str) -> AnomalyImages:
    """``petah.device.golden_data.read_anomaly_part`` as tensors."""
    return _as_set(golden_data.read_anomaly_part(folders, ground_truth, intensity), source, intensity)


def _as_set(found: golden_data.AnomalyFolder, source: str, intensity: str) -> AnomalyImages:
    return anomaly_set([torch.from_numpy(image) for image in found.images], found.defects,
                       [None if mask is None else torch.from_numpy(mask) for mask in found.masks], source, intensity)


def load_anomaly_folder(root: str | Path, intensity: str = DEFAULT_INTENSITY, truth: Path | None = None,
                        source: str | None = None) -> AnomalyImages:
    """One held-out folder (a validation part, a device's golden set): ``good/`` and ``<defect>/``
    folders, masks from ``truth/<defect>/<stem>_mask.png`` (default: ``ground_truth/`` inside it);
    read by ``petah.device.golden_data.read_anomaly_folder``."""
    return _as_set(golden_data.read_anomaly_folder(root, intensity, truth), source or str(Path(root)), intensity)


def load_anomaly_splits(root: str | Path, val_split: float | None = None, seed: int = 0,
                        intensity: str = DEFAULT_INTENSITY) -> tuple[AnomalyImages, AnomalyImages]:
    """(train, val) of an anomaly folder (MVTec AD or plain layout, see the module's doc)."""
    root = Path(root)
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise PetahError(f"{root}: an anomaly dataset needs train/ (good images only; MVTec AD: train/good/)")
    extra = [p.name for p in subfolders(train_dir) if p.name != GOOD]
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
