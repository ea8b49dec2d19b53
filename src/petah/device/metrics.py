"""The golden-set gate's metrics in numpy, equal to what the full install computes with
torchmetrics (and pycocotools behind it) for the same predictions: mIoU, COCO mAP at IoU 0.5 and
image AUROC. The device install has neither library (torchmetrics needs torch), so their
definitions are written here; ``tests/test_runtime.py`` checks them against the libraries."""

from __future__ import annotations

import numpy as np

from petah.device.golden_data import IGNORE

# --- segmentation --------------------------------------------------------------------------------


def confusion_matrix(target: np.ndarray, predicted: np.ndarray, classes: int, ignore: int = IGNORE) -> np.ndarray:
    """(classes, classes) pixel counts, rows the target class, columns the predicted one; pixels
    whose target is ``ignore`` are left out (torchmetrics' ``MulticlassConfusionMatrix(ignore_index=)``).
    Sum the matrices of several batches to score them together."""
    target, predicted = np.asarray(target).reshape(-1), np.asarray(predicted).reshape(-1)
    kept = target != ignore
    bins = target[kept].astype(np.int64) * classes + predicted[kept].astype(np.int64)
    return np.bincount(bins, minlength=classes * classes).reshape(classes, classes)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per class, intersection over union (float32), nan for a class absent from both prediction and
    target: ``MulticlassJaccardIndex(average=None, ignore_index=255, zero_division=nan)``."""
    confusion = np.asarray(confusion, dtype=np.float32)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union != 0, hits / union, np.float32("nan")).astype(np.float32)


def mean_iou(confusion: np.ndarray) -> float:
    """The mean of ``class_iou`` over the classes that have one (0.0 when none has), as
    ``petah.tasks.segmentation``'s mIoU takes it (``nanmean``; the sum's order may differ from
    torch's in the last bit of a float32)."""
    iou = class_iou(confusion)
    if np.isnan(iou).all():
        return 0.0
    return float(np.nanmean(iou.astype(np.float64)))


# --- detection -----------------------------------------------------------------------------------

IOU_THRESHOLD = 0.5
MAX_DETECTIONS = 100  # per image and class, COCO's largest maxDets


def recall_thresholds() -> np.ndarray:
    """COCO's 101 recall points as torchmetrics hands them to pycocotools: ``torch.linspace(0, 1,
    101)`` in float32 as torch's vectorised CPU kernel computes it (one rounding of ``step * i``, the
    second half counted down from 1), then as doubles. They differ from pycocotools' own float64
    ``np.linspace`` in the last bits, which decides on which side a recall of exactly k / n (e.g.
    0.2 with 5 boxes) falls (``searchsorted(side="left")``)."""
    step = np.float64(np.float32(1) / np.float32(100))  # step * i and 1 - step * i are exact in float64
    i = np.arange(101)
    return np.where(i < 50, step * i, 1 - step * (100 - i)).astype(np.float32).astype(np.float64)


def _xywh(boxes: np.ndarray) -> np.ndarray:
    """xyxy -> xywh in float32 (torchvision's ``box_convert``), then as the doubles pycocotools reads."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    return np.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], axis=1).astype(np.float64)


def box_iou(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(D, G) IoU of xywh boxes as pycocotools' ``bbIou`` (no +1 pixel; corners recomputed as x + w)."""
    dx, dy, dw, dh = (found[:, None, i] for i in range(4))
    gx, gy, gw, gh = (truth[None, :, i] for i in range(4))
    w = np.minimum(dw + dx, gw + gx) - np.maximum(dx, gx)
    h = np.minimum(dh + dy, gh + gy) - np.maximum(dy, gy)
    overlap = (w > 0) & (h > 0)
    inter = np.where(overlap, w * h, 0.0)
    union = (dw * dh + gw * gh) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(overlap, inter / union, 0.0)


def _match(iou: np.ndarray) -> np.ndarray:
    """Which detections (in score order) match a ground truth: each takes the unmatched one it
    overlaps most, at least ``IOU_THRESHOLD``, the last of equals (pycocotools' ``evaluateImg``)."""
    taken = np.zeros(iou.shape[1], dtype=bool)
    matched = np.zeros(iou.shape[0], dtype=bool)
    for d, row in enumerate(iou):
        free = np.where(taken, -np.inf, row)
        if not free.size or free.max() < min(IOU_THRESHOLD, 1 - 1e-10):
            continue
        best = len(free) - 1 - int(np.argmax(free[::-1]))  # the last of equal overlaps wins, as there
        taken[best] = matched[d] = True
    return matched


def _interpolated_precision(scores: list[np.ndarray], matched: list[np.ndarray], truths: int,
                            thresholds: np.ndarray) -> np.ndarray:
    """One class's precision at each recall threshold (pycocotools' ``accumulate``)."""
    scores, matched = np.concatenate(scores), np.concatenate(matched)
    order = np.argsort(-scores, kind="mergesort")
    hits = matched[order]
    tp = np.cumsum(hits).astype(float)
    fp = np.cumsum(~hits).astype(float)
    recall = tp / truths
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # monotone from the right
    at = np.searchsorted(recall, thresholds, side="left")
    reached = at < len(precision)  # recalls never reached count 0
    interpolated = np.zeros(len(thresholds))
    interpolated[reached] = precision[at[reached]]
    return interpolated


def map50(found: list[dict], truth: list[dict]) -> float:
    """COCO mAP at IoU 0.5 over the images: torchmetrics' ``MeanAveragePrecision(box_format="xyxy",
    iou_type="bbox", backend="pycocotools")["map_50"]`` (before its float32 cast). ``found``: per
    image ``boxes`` (K, 4) xyxy, ``scores``, ``labels``; ``truth``: per image ``boxes``, ``labels``.
    Per image and class the detections by score (at most 100), each matched greedily; per class the
    101-point interpolated precision; averaged over the classes with ground truth (-1.0 when none
    has, as COCOeval). Every ground-truth box counts: no crowd boxes, and COCO's "all" area range
    holds any box of a real image."""
    thresholds = recall_thresholds()
    labels = [np.asarray(x["labels"]).reshape(-1) for x in (*found, *truth)]
    columns = []
    for label in np.unique(np.concatenate(labels)) if labels else []:
        scores, matched, truths = [], [], 0
        for dets, gts in zip(found, truth, strict=True):
            mine = np.asarray(dets["labels"]).reshape(-1) == label
            theirs = np.asarray(gts["labels"]).reshape(-1) == label
            if not mine.any() and not theirs.any():
                continue
            score = np.asarray(dets["scores"], dtype=np.float32).reshape(-1)[mine].astype(np.float64)
            order = np.argsort(-score, kind="mergesort")[:MAX_DETECTIONS]
            boxes = _xywh(np.asarray(dets["boxes"]).reshape(-1, 4)[mine])[order]
            gt_boxes = _xywh(np.asarray(gts["boxes"]).reshape(-1, 4)[theirs])
            scores.append(score[order])
            matched.append(_match(box_iou(boxes, gt_boxes)))
            truths += len(gt_boxes)
        if truths:
            columns.append(_interpolated_precision(scores, matched, truths, thresholds))
    if not columns:
        return -1.0
    return float(np.mean(np.stack(columns, axis=1).ravel()))  # COCOeval's order: recall-major, then class


# --- anomaly -------------------------------------------------------------------------------------


def dense_ranks(scores: np.ndarray) -> np.ndarray:
    """Scores mapped to [0, 1] keeping their order and their ties (``petah.tasks.anomaly.auroc``
    hands these to torchmetrics, which would squash scores outside [0, 1] with a sigmoid)."""
    values, rank = np.unique(np.asarray(scores, dtype=np.float64).reshape(-1), return_inverse=True)
    return rank / max(1, len(values) - 1)


def auroc(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``truth`` (True: positive), None when one of the
    two classes is absent: the Mann-Whitney U statistic with ties counted half (what torchmetrics'
    ``BinaryAUROC`` computes on scores in [0, 1])."""
    truth = np.asarray(truth, dtype=bool).reshape(-1)
    if truth.all() or not truth.any():
        return None
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    values, rank = np.unique(scores, return_inverse=True)
    counts = np.bincount(rank, minlength=len(values))
    mid_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based average rank of each distinct score
    positives = int(truth.sum())
    u = mid_rank[rank][truth].sum() - positives * (positives + 1) / 2
    return float(u / (positives * (len(truth) - positives)))


__all__ = ["IOU_THRESHOLD", "MAX_DETECTIONS", "auroc", "box_iou", "class_iou", "confusion_matrix", "map50",
           "dense_ranks", "mean_iou", "recall_thresholds"]
