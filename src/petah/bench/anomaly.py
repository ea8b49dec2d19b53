"""``petah bench anomaly``: petah's anomaly task against PatchCore by the book, on one backbone.

Sets (all offline): ``builtin:surface-anomalies`` (painted defects, with masks) and one-class
benchmarks made from built-in classification sets — each class in turn is "good" (its training
images to learn from), and the validation images of that class and of every other class are the
good and the anomalous test images.

Methods, on the same frozen backbone (the demo backbone, efficientformerv2_s0 at 64 px):

- ``petah``: what ``petah adapt --task anomaly`` writes (its feature level, coreset, threshold),
  scored as the package answers;
- ``patchcore``: PatchCore as its paper describes it (Roth et al., "Towards Total Recall in
  Industrial Anomaly Detection", CVPR 2022): the two middle levels (strides 8 and 16) with 3×3
  aggregation, the coarser upsampled and concatenated, a 10 % greedy coreset, and the image score
  reweighted by how dense the bank is around the most anomalous patch (b = 9 neighbours).
  anomalib itself is not used: its PatchCore downloads ImageNet weights for its own backbone,
  which cannot happen here (and would not be the shared backbone).

Reported: image AUROC (and pixel AUROC where masks exist), stored bytes as % of the backbone,
latency per image against a classification task on the same backbone (the torch runtime,
interleaved), and the targets (within 1 point of PatchCore's image AUROC at <= 5 % of the
backbone's bytes; latency <= 1.5x a classification task).
"""

from __future__ import annotations

import platform
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from petah import api
from petah.backbones import create_backbone, demo_backbone_path
from petah.backbones.features import feature_levels, level_indices, multi_scale_features
from petah.data import load_dataset
from petah.data.anomaly import AnomalyImages, anomaly_set
from petah.data.builtin import surface_anomalies
from petah.export.timing import interleaved_medians
from petah.packages import encode_package
from petah.runtime import Runtime
from petah.tasks.anomaly import (
    FEATURE_STRIDES,
    Anomaly,
    AnomalyConfig,
    auroc,
    coreset_indices,
    patch_features,
    pixel_auroc,
    smooth,
)

BOOK_STRIDES = FEATURE_STRIDES  # the paper's two middle levels
BOOK_CORESET = 0.1
BOOK_NEIGHBOURS = 9  # b in the paper's reweighting
ONE_CLASS_SETS = ("textures", "faces")


def one_class_sets(name: str) -> list[tuple[str, AnomalyImages, AnomalyImages]]:
    """Each class of a built-in classification set as "good" in turn: its training images to learn
    from; validation images of every class to score (the others' are the anomalies)."""
    train, val = load_dataset(f"builtin:{name}")
    sets = []
    for c, cls in enumerate(train.classes):
        good_train = [img for img, label in zip(train.images, train.labels.tolist(), strict=True) if label == c]
        defects = ["good" if label == c else train.classes[label] for label in val.labels.tolist()]
        sets.append((f"{name}:{cls}", anomaly_set(good_train, ["good"] * len(good_train), [None] * len(good_train),
                                                  f"{name}:{cls}[train]"),
                     anomaly_set(list(val.images), defects, [None] * len(val), f"{name}:{cls}[val]")))
    return sets


class BookPatchCore:
    """PatchCore by the paper, on the backbone's own features (the reference petah is held to)."""

    def __init__(self, backbone, seed: int = 0):
        self.backbone, self.seed = backbone, seed
        levels = feature_levels(backbone.model)
        level_indices(backbone.model, BOOK_STRIDES)  # refuses a backbone without those levels
        self.dim = sum(levels[i]["num_chs"] for i in level_indices(backbone.model, BOOK_STRIDES))
        self.sigma = 4.0 * backbone.img_size / 224
        self.bank = torch.empty(0)

    @torch.no_grad()
    def patches(self, images: torch.Tensor) -> torch.Tensor:
        return patch_features(multi_scale_features(self.backbone.model.eval(), images, BOOK_STRIDES))

    @torch.no_grad()
    def fit(self, loader) -> None:
        collected = [self.patches(x).permute(0, 2, 3, 1).reshape(-1, self.dim) for x, _labels, _masks in loader]
        features = torch.cat(collected)
        keep = coreset_indices(features, max(1, int(len(features) * BOOK_CORESET)), self.seed)
        self.bank = features[keep]

    @torch.no_grad()
    def score(self, images: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        """Image scores (reweighted) and anomaly maps at the input size."""
        patches = self.patches(images)
        n, d, h, w = patches.shape
        flat = patches.permute(0, 2, 3, 1).reshape(n, h * w, d)
        scores, maps = [], []
        for one in flat:
            distances = torch.cdist(one, self.bank)
            nearest, index = distances.min(dim=1)
            worst = int(nearest.argmax())
            anchor = self.bank[index[worst]]
            # the paper's reweighting: a test patch far from a sparse part of the bank counts less
            neighbours = torch.cdist(anchor[None], self.bank)[0].topk(min(BOOK_NEIGHBOURS, len(self.bank)),
                                                                       largest=False).indices
            to_neighbours = torch.cdist(one[worst][None], self.bank[neighbours])[0]
            weight = 1 - torch.exp(nearest[worst] - torch.logsumexp(to_neighbours, 0))  # stable softmax
            scores.append(float(weight * nearest[worst]))
            maps.append(nearest.reshape(1, h, w))
        upsampled = F.interpolate(torch.stack(maps), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return np.array(scores), smooth(upsampled, self.sigma)[:, 0]

    @property
    def stored_bytes(self) -> int:
        return self.bank.numel() * 2  # held in fp16, as petah stores its bank (the reference at its smallest)


def book_metrics(book: BookPatchCore, loader) -> dict:
    scores, labels, maps, masks = [], [], [], []
    for images, targets, target_masks in loader:
        s, m = book.score(images)
        scores += s.tolist()
        labels += targets.tolist()
        maps += list(m)
        masks += list(target_masks)
    return {"image_auroc": auroc(np.array(scores), np.array(labels, dtype=bool)),
            "pixel_auroc": pixel_auroc(maps, masks)}


def run_set(backbone, name: str, train: AnomalyImages, val: AnomalyImages, seed: int = 0) -> dict:
    preprocess = api.preprocess_for(backbone)
    started = time.perf_counter()
    result = api.adapt(backbone, train, val, task_name="bench", anomaly=AnomalyConfig())
    petah_seconds = time.perf_counter() - started
    book = BookPatchCore(backbone, seed)
    started = time.perf_counter()
    book.fit(api.eval_loader(train, preprocess, Anomaly))
    book_seconds = time.perf_counter() - started
    reference = book_metrics(book, api.eval_loader(val, preprocess, Anomaly))
    weights = backbone.weights_bytes
    package_bytes = len(encode_package(result.package))
    return {
        "set": name, "train_images": len(train), "val_images": len(val), "anomalous": int(val.labels.sum()),
        "petah": {"image_auroc": result.metrics["image_auroc"], "pixel_auroc": result.metrics["pixel_auroc"],
                  "f1": result.metrics["f1"], "bytes": package_bytes,
                  "percent": round(100 * package_bytes / weights, 3),
                  "bank_rows": result.package.manifest.training["bank_rows"], "fit_seconds": round(petah_seconds, 2)},
        "patchcore": {**reference, "bytes": book.stored_bytes, "percent": round(100 * book.stored_bytes / weights, 3),
                      "bank_rows": len(book.bank), "fit_seconds": round(book_seconds, 2)},
        "package": result.package,
    }


def latency_rows(backbone, anomaly_package, repeats: int) -> list[dict]:
    """Per image, the torch runtime answering the anomaly task vs the demo's classification task
    (digits) on the same backbone, interleaved, at batch 1 and 8."""
    from petah.serve import demo_packages

    runtime = Runtime(backbone)
    runtime.load(anomaly_package, name="anomaly")
    runtime.load(next(p for p in demo_packages() if p.stem == "digits"), name="classification")
    image = torch.randint(0, 256, (3, backbone.img_size, backbone.img_size), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    rows = []
    for batch in (1, 8):
        times = interleaved_medians({task: (lambda t=task, n=batch: runtime.run([image] * n, [t])) for task in
                                     ("anomaly", "classification")}, repeats)
        rows.append({"batch": batch, "anomaly_ms": round(1000 * times["anomaly"] / batch, 3),
                     "classification_ms": round(1000 * times["classification"] / batch, 3),
                     "ratio": round(times["anomaly"] / times["classification"], 3)})
    return rows


def run_anomaly_bench(one_class: tuple[str, ...] = ONE_CLASS_SETS, repeats: int = 30, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    backbone = create_backbone(weights=str(demo_backbone_path()))
    started = time.perf_counter()
    sets = [("surface-anomalies", *surface_anomalies())]
    for name in one_class:
        sets += one_class_sets(name)
    rows = [run_set(backbone, name, train, val, seed) for name, train, val in sets]
    latency = latency_rows(backbone, rows[0]["package"], repeats)
    for row in rows:
        del row["package"]
    mean = {method: round(statistics.mean(r[method]["image_auroc"] for r in rows), 4)
            for method in ("petah", "patchcore")}
    largest = max(r["petah"]["percent"] for r in rows)
    worst_latency = max(r["ratio"] for r in latency)
    return {
        "backbone": backbone.describe(), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "sets": rows, "latency": latency,
        "mean_image_auroc": mean,
        "targets": {
            "auroc_within_1_point": mean["petah"] >= mean["patchcore"] - 0.01,
            "auroc_gap_points": round(100 * (mean["petah"] - mean["patchcore"]), 2),
            "bytes_at_most_5_percent": largest <= 5.0, "largest_percent": largest,
            "latency_at_most_1_5x": worst_latency <= 1.5, "latency_ratio": worst_latency,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


__all__ = ["BookPatchCore", "one_class_sets", "run_anomaly_bench"]
