"""Anomaly detection from good parts only: a PatchCore-style memory bank on the frozen backbone.

Fitting needs no training: every good training image's patch features (a backbone feature map,
each position averaged over its 3×3 neighbourhood: PatchCore's locally aware patch features; with
several levels the coarser ones are upsampled and concatenated) are pooled, and a greedy k-center
coreset keeps the few that cover them all. A test patch's anomaly is its distance to the nearest
bank entry; the map is those distances on the feature grid, upsampled and smoothed, and the image score
its maximum. The bank is the task's head: stored in fp16, it is the whole package beside the
manifest (no adapter, no copy of the backbone).

Why a memory bank and not PaDiM's per-position Gaussians: PaDiM stores a D×D covariance per
feature position — on efficientformerv2_s0 at 64 px (D = 144, 8×8 positions) 2.6 MB in fp16, a
third of the backbone, where a 1,000-patch coreset is 0.29 MB; and its positions assume aligned
parts, which a camera crop of a surface does not give.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from petah.backbones.features import feature_levels, level_indices, multi_scale_features
from petah.device import decode
from petah.device.metrics import dense_ranks
from petah.errors import PetahError
from petah.files import atomic_write_image
from petah.options import option

METHOD = "patchcore"
BANK_DTYPE = torch.float16
FEATURE_STRIDES = (8, 16)  # PatchCore's usual pair (a ResNet's layers 2 and 3)
MIN_GRID = 8  # patches a side the bank's default feature level keeps (see feature_stride)
PROJECTION_DIM = 128  # coreset selection runs on a random projection (Johnson-Lindenstrauss), as PatchCore does
LABELS = ("good", "anomaly")
MAX_BANK_ROWS = 100_000  # the largest count a manifest's head may declare (29 MB at 144 dims: past any device)


@dataclass
class AnomalyConfig:
    """How an anomaly task's bank and threshold are chosen (``petah adapt --task anomaly``)."""

    coreset_ratio: float = option(0.1, cli="--coreset-ratio",
                                  help="Anomaly: the share of the good images' patch features the memory bank keeps "
                                       "(a greedy k-center coreset; a --budget caps it further).")
    feature_strides: list[int] = option(default_factory=list, cli="--feature-stride",
                                        help="Anomaly: the backbone feature level(s) the bank holds, by stride "
                                             "(repeatable: 8 and 16 is PatchCore's usual pair; default: the "
                                             "coarsest level whose grid is still 8 patches a side). Finer finds "
                                             "thinner defects, coarser tells other parts apart.")
    max_false_reject: float | None = option(None, cli="--max-false-reject",
                                            help="Anomaly: the threshold lets at most this share of good validation "
                                                 "images be called anomalous (default: the best F1 on validation "
                                                 "images with defects, or 0.01 when it has none).")

    def __post_init__(self):
        if not 0 < self.coreset_ratio <= 1:
            raise PetahError(f"--coreset-ratio must be in (0, 1], got {self.coreset_ratio}")
        if self.max_false_reject is not None and not 0 <= self.max_false_reject < 1:
            raise PetahError(f"--max-false-reject must be in [0, 1), got {self.max_false_reject}")
        self.feature_strides = sorted({int(s) for s in self.feature_strides})
        if any(s < 1 for s in self.feature_strides) or len(self.feature_strides) > 4:
            raise PetahError(f"--feature-stride takes 1 to 4 strides of at least 1, got {self.feature_strides}")


class PatchBank(nn.Module):
    """The task's head: the coreset of good patch features and the decision threshold."""

    def __init__(self, in_channels: list[int], size: int, strides: tuple[int, ...] = FEATURE_STRIDES,
                 threshold: float = 0.0, blur_sigma: float = 1.0):
        super().__init__()
        if size < 1 or not in_channels:
            raise ValueError("an anomaly bank needs at least one entry and one feature level")
        self.in_channels, self.strides = [int(c) for c in in_channels], tuple(int(s) for s in strides)
        self.threshold, self.blur_sigma = float(threshold), float(blur_sigma)
        self.register_buffer("bank", torch.zeros(int(size), sum(self.in_channels), dtype=BANK_DTYPE))

    @property
    def size(self) -> int:
        return int(self.bank.shape[0])

    def distances(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, D, h, w) patch features → (N, 1, h, w) distance of each to its nearest bank entry."""
        n, d, h, w = patches.shape
        flat = patches.permute(0, 2, 3, 1).reshape(-1, d).float()
        bank = self.bank.float()
        # |a - b|² = |a|² - 2 a·b + |b|²: one matrix product (and plain ONNX ops, unlike cdist)
        squared = (flat * flat).sum(1, keepdim=True) - 2 * flat @ bank.T + (bank * bank).sum(1)[None]
        nearest = squared.min(dim=1).values.clamp_min(0).sqrt()
        return nearest.reshape(n, 1, h, w)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return self.distances(patch_features(features))


def feature_stride(levels: list[dict], img_size: int) -> int:
    """The default level of the bank: the coarsest whose grid is still >= ``MIN_GRID`` patches a
    side (the finest there is, on very small inputs). Measured on the demo backbone at 64 px,
    image AUROC over builtin:surface-anomalies and the one-class sets of textures and faces (6
    sets, coreset 10 %; petah bench anomaly): stride 8 alone 0.867 mean, 16 alone 0.870, 8 + 16
    0.864, 4 alone 0.762 — fine levels find thin painted defects (surface-anomalies 0.917 at
    stride 4, 0.848 at 8) but cannot tell one texture from another (textures:gravel 0.37 at 4, 0.56
    at 8, 0.80 at 16), and cost 4x the patches. Stride 8 is within 0.3 points of the best mean at
    a quarter of 4's patches; ``--feature-stride`` chooses others."""
    strides = sorted({int(level["reduction"]) for level in levels})
    fine_enough = [s for s in strides if img_size // s >= MIN_GRID]
    return max(fine_enough) if fine_enough else strides[0]


def patch_features(features: list[torch.Tensor]) -> torch.Tensor:
    """PatchCore's locally aware patch features: each level averaged over 3×3 neighbours, brought to
    the finest level's grid, concatenated along channels."""
    pooled = [F.avg_pool2d(f, 3, stride=1, padding=1) for f in features]
    grid = pooled[0].shape[-2:]
    coarser = [F.interpolate(p, size=grid, mode="bilinear", align_corners=False) for p in pooled[1:]]
    return torch.cat(pooled[:1] + coarser, dim=1)


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """A Gaussian blur of (N, 1, H, W) maps (PatchCore smooths its upsampled map the same way),
    normalised at the borders (the weights that fall outside are left out, not zeros averaged in:
    plain convolutions, which export to ONNX cleanly)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-x**2 / (2 * sigma**2))
    rows, cols = kernel.view(1, 1, 1, -1), kernel.view(1, 1, -1, 1)

    def blur(m: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(m, rows, padding=(0, radius)), cols, padding=(radius, 0))

    return blur(maps) / blur(torch.ones_like(maps[:1]))


class AnomalyModel(nn.Module):
    """Backbone features → distance to the bank → an anomaly map at the input size (N, 1, H, W)."""

    def __init__(self, backbone: nn.Module, head: PatchBank):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distances = self.head(multi_scale_features(self.backbone, x, self.head.strides))
        maps = F.interpolate(distances, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return smooth(maps, self.head.blur_sigma)


def coreset_indices(features: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Greedy k-center selection (PatchCore's coreset): each step takes the point farthest from
    those taken, so the kept points cover the whole set; run on a random projection for speed."""
    count = min(count, len(features))
    gen = torch.Generator().manual_seed(seed)
    if features.shape[1] > PROJECTION_DIM:
        projection = torch.randn(features.shape[1], PROJECTION_DIM, generator=gen) / math.sqrt(PROJECTION_DIM)
        features = features @ projection
    chosen = torch.empty(count, dtype=torch.long)
    chosen[0] = int(torch.randint(len(features), (1,), generator=gen))
    nearest = torch.cdist(features, features[chosen[:1]]).squeeze(1)
    for i in range(1, count):
        chosen[i] = int(nearest.argmax())
        nearest = torch.minimum(nearest, torch.cdist(features, features[chosen[i : i + 1]]).squeeze(1))
    return chosen


def bank_rows(budget_bytes: int | None, dim: int, patches: int, ratio: float) -> int:
    """How many patch features the bank keeps: the coreset ratio of the good patches, capped by the
    bytes a budget leaves for it (each row ``dim`` fp16 values) and by ``MAX_BANK_ROWS``."""
    rows = min(max(1, int(round(patches * ratio))), MAX_BANK_ROWS)
    if budget_bytes is not None:
        fits = budget_bytes // (dim * BANK_DTYPE.itemsize)
        if fits < 1:
            raise PetahError(f"the budget leaves {budget_bytes} bytes for the anomaly bank; one entry of {dim} "
                             f"features needs {dim * BANK_DTYPE.itemsize}")
        rows = min(rows, int(fits))
    return rows


def choose_threshold(scores: np.ndarray, anomalous: np.ndarray, max_false_reject: float | None) -> tuple[float, str]:
    """The decision threshold from validation image scores, and the rule that chose it: the largest
    threshold keeping good images' false rejects within ``max_false_reject``; without it, the best
    F1 where the validation set has anomalies, else a 1 % false-reject rate."""
    good = np.sort(scores[~anomalous])
    if len(good) == 0:
        raise PetahError("the validation set has no good image: an anomaly threshold needs some")
    if max_false_reject is None and anomalous.any():
        candidates = np.unique(scores)
        best, best_f1 = candidates[0], -1.0
        for t in candidates:  # called anomalous: score > t
            flagged = scores > t
            tp = int((flagged & anomalous).sum())
            f1 = 2 * tp / max(1, int(flagged.sum()) + int(anomalous.sum()))
            if f1 > best_f1:
                best, best_f1 = t, f1
        return float(best), "best F1 on validation"
    rate = 0.01 if max_false_reject is None else max_false_reject
    allowed = int(math.floor(rate * len(good)))  # good images that may score above the threshold
    threshold = float(good[len(good) - 1 - allowed])
    return threshold, f"at most {100 * rate:g} % false rejects on good validation images"


class Anomaly:
    """The anomaly task kind: a memory bank of good patches (fitted, not trained), image and pixel AUROC."""

    kind = "anomaly"
    primary_metric = "image_auroc"
    lora_plus = 1.0  # never trained: its bank is fitted on the frozen backbone
    default_budget = None  # the bank takes what it needs unless --budget bounds it
    first_run = None  # nothing is trained
    fitted = True  # no gradient training: ``petah.api.adapt`` fits the bank instead

    @staticmethod
    def head_for(backbone, classes: int = 2, size: int = 1, strides: list[int] | None = None) -> PatchBank:
        """An empty bank on ``strides`` (default: ``feature_stride``'s level); finest first."""
        levels = feature_levels(backbone.model)
        strides = tuple(sorted(strides)) if strides else (feature_stride(levels, backbone.img_size),)
        channels = [levels[i]["num_chs"] for i in level_indices(backbone.model, strides)]
        return PatchBank(channels, size, strides, blur_sigma=max(0.5, 4.0 * backbone.img_size / 224))

    @staticmethod
    def head_manifest(head: PatchBank) -> dict:
        return {"type": METHOD, "method": METHOD, "out_features": len(LABELS), "in_channels": head.in_channels,
                "size": head.size,
                "strides": list(head.strides), "threshold": head.threshold, "blur_sigma": head.blur_sigma}

    @staticmethod
    def head_from_manifest(info: dict) -> PatchBank:
        if info.get("method") != METHOD:
            raise ValueError(f"unknown anomaly method {info.get('method')!r} (this petah knows {METHOD})")
        threshold, sigma = float(info["threshold"]), float(info["blur_sigma"])
        if not (math.isfinite(threshold) and math.isfinite(sigma) and 0 <= sigma <= 64):
            raise ValueError("threshold and blur_sigma must be finite (blur_sigma at most 64)")
        return PatchBank([int(c) for c in info["in_channels"]], int(info["size"]),
                         tuple(int(s) for s in info["strides"]), threshold, sigma)

    @staticmethod
    def build_model(backbone: nn.Module, head: nn.Module) -> nn.Module:
        return AnomalyModel(backbone, head)

    @staticmethod
    def view(data, preprocess, augment=None, seed: int = 0):
        from petah.data.anomaly import AnomalyView

        return AnomalyView(data, preprocess)

    @staticmethod
    @torch.no_grad()
    def fit(backbone, head: PatchBank, loader, rows_for, seed: int = 0) -> PatchBank:
        """Fill ``head``'s bank from the good images of ``loader``: ``rows_for(patches)`` says how
        many entries to keep (the coreset ratio, capped by a budget)."""
        collected = []
        backbone.eval()
        for images, _labels, _masks in loader:
            patches = patch_features(multi_scale_features(backbone, images, head.strides))
            collected.append(patches.permute(0, 2, 3, 1).reshape(-1, patches.shape[1]))
        features = torch.cat(collected)
        keep = coreset_indices(features, rows_for(len(features)), seed)
        fitted = PatchBank(head.in_channels, len(keep), head.strides, head.threshold, head.blur_sigma)
        fitted.bank.copy_(features[keep].to(BANK_DTYPE))
        return fitted

    @staticmethod
    @torch.no_grad()
    def scores(model: AnomalyModel, loader) -> tuple[np.ndarray, np.ndarray, list, list]:
        """Image scores, labels (1: anomalous), and per image its map and mask (None where the data has none)."""
        model.eval()
        scores, labels, maps, masks = [], [], [], []
        for images, targets, target_masks in loader:
            out = model(images)
            scores += out.flatten(1).max(dim=1).values.tolist()
            labels += targets.tolist()
            maps += list(out[:, 0])
            masks += list(target_masks)
        return np.array(scores), np.array(labels, dtype=bool), maps, masks

    @classmethod
    def evaluate(cls, model: AnomalyModel, loader, classes: list[str] | None = None) -> dict:
        """Image AUROC, pixel AUROC (where masks exist), and precision / recall / F1 at the head's threshold."""
        return report(*cls.scores(model, loader), model.head.threshold)

    @staticmethod
    @torch.no_grad()
    def decode(maps: torch.Tensor, classes: list[str], top_k: int = 3, sizes=None, head: PatchBank | None = None,
               **_context) -> list[dict]:
        """Per image: its score (the map's maximum), the decision against the threshold, and the
        map at the image's own size (float distances; ``anomaly_map_png`` makes it an image)."""
        threshold = head.threshold if head is not None else float("inf")
        rows = decode.anomaly(maps.detach().float().cpu().numpy(), list(LABELS), threshold, sizes)  # one definition
        return [{**row, "anomaly_map": torch.from_numpy(row["anomaly_map"])} for row in rows]


def report(scores: np.ndarray, anomalous: np.ndarray, maps: list, masks: list, threshold: float) -> dict:
    """The metrics of ``Anomaly.scores``' output at ``threshold`` (scored once, judged here)."""
    flagged = scores > threshold
    tp, fp = int((flagged & anomalous).sum()), int((flagged & ~anomalous).sum())
    fn = int((~flagged & anomalous).sum())
    return {
        "image_auroc": auroc(scores, anomalous),
        "pixel_auroc": pixel_auroc(maps, masks),
        "threshold": round(threshold, 6),
        "precision": round(tp / max(1, tp + fp), 6), "recall": round(tp / max(1, tp + fn), 6),
        "f1": round(2 * tp / max(1, 2 * tp + fp + fn), 6),
        "accuracy": round(float((flagged == anomalous).mean()), 6) if len(scores) else 0.0,
        "false_reject_rate": round(fp / max(1, int((~anomalous).sum())), 6),
        "images": int(len(scores)), "anomalous_images": int(anomalous.sum()),
    }


def pixel_auroc(maps: list[torch.Tensor], masks: list[torch.Tensor | None]) -> float | None:
    """AUROC over the pixels of the images whose mask is known (None when none is)."""
    known = [(m, t) for m, t in zip(maps, masks, strict=True) if t is not None and t.numel()]
    if not known:
        return None
    return auroc(torch.cat([m.flatten() for m, _ in known]).numpy(),
                 torch.cat([t.flatten() > 0 for _, t in known]).numpy())


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """AUROC (torchmetrics), or None when one of the two classes is absent. The scores go in as their
    ranks in [0, 1]: torchmetrics squashes scores outside [0, 1] with a sigmoid, which tied every
    distance above ~17 (measured: it understated AUROC where distances are large)."""
    if truth.all() or not truth.any():
        return None
    from torchmetrics.classification import BinaryAUROC  # slow to import: only where a score is computed

    return round(float(BinaryAUROC()(torch.as_tensor(dense_ranks(scores), dtype=torch.float64),
                                     torch.as_tensor(truth, dtype=torch.long))), 6)


def anomaly_map_image(anomaly_map: torch.Tensor, threshold: float):
    """The map as an 8-bit grey image: 0 at distance 0, 128 at the threshold, 255 at twice it."""
    return decode.anomaly_map_image(anomaly_map.numpy(), threshold)


def save_anomaly_map(anomaly_map: torch.Tensor, threshold: float, path) -> None:
    atomic_write_image(anomaly_map_image(anomaly_map, threshold), path)


def save_heatmap(image: torch.Tensor, anomaly_map: torch.Tensor, threshold: float, path, alpha: float = 0.6) -> None:
    """The image with the map drawn over it in red: none up to the threshold, strongest at twice it."""
    from PIL import Image

    rgb = image.permute(1, 2, 0).numpy().astype(np.float32)
    level = np.clip(anomaly_map.numpy() / max(threshold, 1e-12) - 1, 0, 1)[..., None] * alpha
    red = np.array([230, 25, 75], dtype=np.float32)
    atomic_write_image(Image.fromarray(((1 - level) * rgb + level * red).clip(0, 255).astype(np.uint8)), path)


def anomaly_map_png(anomaly_map: torch.Tensor, threshold: float) -> bytes:
    return decode.anomaly_map_png(anomaly_map.numpy(), threshold)


__all__ = ["LABELS", "METHOD", "Anomaly", "AnomalyConfig", "AnomalyModel", "PatchBank", "anomaly_map_image",
           "anomaly_map_png", "auroc", "bank_rows", "choose_threshold", "coreset_indices", "patch_features",
           "pixel_auroc", "report", "save_anomaly_map", "save_heatmap", "smooth"]
