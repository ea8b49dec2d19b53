"""Answers from a graph's outputs, in numpy: what the device engine returns, and what the torch
task kinds return too (one definition of each answer)."""

from __future__ import annotations

import io

import numpy as np

from petah.imaging import resize_bilinear
from petah.packages.reference import softmax_confidence

# torchvision's FCOS post-processing as petah's detection head uses it (petah.tasks.detection._engine):
# the device has no torchvision, so the same steps are written here in numpy and checked against it
NMS_IOU, TOPK_CANDIDATES, DETECTIONS_PER_IMAGE = 0.6, 1000, 100
PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60]], dtype=np.uint8)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def classification(logits: np.ndarray, classes: list[str], top_k: int = 3) -> list[dict]:
    """Per image: the top label and score, and the ``top_k`` labels by score (ties: lower index first)."""
    probs = softmax(np.asarray(logits, dtype=np.float32))
    k = min(top_k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    rows = []
    for p, idx in zip(probs, order, strict=True):
        top = [{"label": classes[int(j)], "score": round(float(p[j]), 6)} for j in idx]
        rows.append({"label": top[0]["label"], "score": top[0]["score"], "top": top})
    return rows


def segmentation(logits: np.ndarray, classes: list[str], sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Per image: the class-index mask at the image's own size (bilinear, as torch resizes), each
    class's pixel share, and the confidence (the mean top-class probability over the model's pixels)."""
    out = []
    for i, row in enumerate(np.asarray(logits, dtype=np.float32)):
        confidence = float(softmax_confidence(row, axis=0).mean())
        if sizes is not None:
            row = resize_bilinear(row, *sizes[i])
        mask = row.argmax(0).astype(np.uint8)
        counts = np.bincount(mask.reshape(-1), minlength=len(classes)) / mask.size
        out.append({"mask": mask, "pixels": {c: round(float(f), 6) for c, f in zip(classes, counts, strict=True)
                                             if f > 0}, "confidence": round(confidence, 6)})
    return out


def anomaly(maps: np.ndarray, classes: list[str], threshold: float,
            sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Per image: its score (the map's maximum), the decision against the threshold, and the map at
    the image's own size (float distances; ``anomaly_map_png`` makes it an image)."""
    out = []
    for i, row in enumerate(np.asarray(maps, dtype=np.float32)):
        row = row[0]
        if sizes is not None:
            row = resize_bilinear(row, *sizes[i])
        score = float(row.max())
        out.append({"label": classes[int(score > threshold)], "score": round(score, 6),
                    "threshold": round(threshold, 6), "anomalous": bool(score > threshold), "anomaly_map": row})
    return out


def mask_image(mask: np.ndarray):
    """A palette image of class indices (VOC style): viewers show colours, tools read indices."""
    from PIL import Image

    image = Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="P")
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(PALETTE)] = PALETTE
    image.putpalette(palette.flatten().tolist())
    return image


def mask_png(mask: np.ndarray) -> bytes:
    """The class-index mask as PNG bytes (what the station sends)."""
    buffer = io.BytesIO()
    mask_image(mask).save(buffer, format="PNG")
    return buffer.getvalue()


def anomaly_map_image(anomaly_map: np.ndarray, threshold: float):
    """An anomaly map as an 8-bit grey image: 0 at distance 0, 128 at the threshold, 255 at twice it."""
    from PIL import Image

    scale = 128.0 / threshold if threshold > 0 else 1.0
    return Image.fromarray(np.clip(np.rint(np.asarray(anomaly_map) * scale), 0, 255).astype(np.uint8), mode="L")


def anomaly_map_png(anomaly_map: np.ndarray, threshold: float) -> bytes:
    buffer = io.BytesIO()
    anomaly_map_image(anomaly_map, threshold).save(buffer, format="PNG")
    return buffer.getvalue()


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fcos_anchors(img_size: int, grids: list[int], strides: list[int]) -> list[np.ndarray]:
    """torchvision's AnchorGenerator for one square anchor of the level's stride per location:
    centred on the grid points, the grid step being ``img_size // grid``."""
    anchors = []
    for grid, stride in zip(grids, strides, strict=True):
        half = round(stride / 2)
        step = img_size // grid
        ys, xs = np.meshgrid(np.arange(grid) * step, np.arange(grid) * step, indexing="ij")
        xs, ys = xs.reshape(-1).astype(np.float32), ys.reshape(-1).astype(np.float32)
        anchors.append(np.stack([xs - half, ys - half, xs + half, ys + half], axis=1))
    return anchors


def overlap_matrix(boxes: np.ndarray, iou: float) -> np.ndarray:
    """Which pairs of (x0, y0, x1, y1) boxes overlap by more than ``iou`` (intersection over union)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    x0 = np.maximum(boxes[:, None, 0], boxes[None, :, 0])
    y0 = np.maximum(boxes[:, None, 1], boxes[None, :, 1])
    x1 = np.minimum(boxes[:, None, 2], boxes[None, :, 2])
    y1 = np.minimum(boxes[:, None, 3], boxes[None, :, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    with np.errstate(divide="ignore", invalid="ignore"):  # degenerate boxes: torchvision keeps them too
        return (inter / (area[:, None] + area[None, :] - inter)) > iou


def nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou: float, limit: int) -> np.ndarray:
    """Class-wise greedy non-maximum suppression (boxes of different classes never suppress each
    other), as torchvision's ``batched_nms``: the indices kept, best score first, at most ``limit``.
    One small overlap matrix per class; the greedy pass visits boxes in score order and stops at
    ``limit`` kept (a numpy pass per box over all of them measured 2.3 ms on the demo's detection task)."""
    classes = {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}
    overlaps = {c: overlap_matrix(boxes[idx], iou) for c, idx in classes.items()}
    suppressed = {c: np.zeros(len(idx), dtype=bool) for c, idx in classes.items()}
    position = np.zeros(len(boxes), dtype=np.int64)
    for idx in classes.values():
        position[idx] = np.arange(len(idx))
    keep: list[int] = []
    for i in np.argsort(-scores, kind="stable"):
        c, p = int(labels[i]), int(position[i])
        if suppressed[c][p]:
            continue
        keep.append(int(i))
        if len(keep) == limit:
            break
        suppressed[c] |= overlaps[c][p]
    return np.asarray(keep, dtype=np.int64)


def fcos_detections(outputs: np.ndarray, img_size: int, grids: list[int], strides: list[int],
                    score_threshold: float) -> list[dict[str, np.ndarray]]:
    """Boxes (xyxy, input pixels), scores and labels per image from the head's raw output
    (N, locations, classes + 4 + 1): per level, score = sqrt(sigmoid(class) * sigmoid(centerness))
    above the threshold, the top candidates, boxes decoded as ltrb distances scaled by the anchor
    size and clipped; then class-wise NMS over all levels, the best 100 kept."""
    outputs = np.asarray(outputs, dtype=np.float32)
    classes = outputs.shape[2] - 5
    per_level = [g * g for g in grids]
    if sum(per_level) != outputs.shape[1]:
        raise ValueError(f"{outputs.shape[1]} locations do not match the head's feature maps {grids}")
    anchors = fcos_anchors(img_size, grids, strides)
    found = []
    for image in outputs:
        boxes, scores, labels = [], [], []
        start = 0
        for count, level_anchors in zip(per_level, anchors, strict=True):
            level = image[start:start + count]
            start += count
            score = np.sqrt(sigmoid(level[:, :classes]) * sigmoid(level[:, classes + 4:]))
            flat = score.reshape(-1)
            candidates = np.flatnonzero(flat > score_threshold)
            if candidates.size > TOPK_CANDIDATES:
                candidates = candidates[np.argsort(-flat[candidates], kind="stable")[:TOPK_CANDIDATES]]
            where, label = candidates // classes, candidates % classes
            anchor = level_anchors[where]
            size = np.stack([anchor[:, 2] - anchor[:, 0], anchor[:, 3] - anchor[:, 1]] * 2, axis=1)
            codes = level[where, classes:classes + 4] * size
            cx, cy = (anchor[:, 0] + anchor[:, 2]) / 2, (anchor[:, 1] + anchor[:, 3]) / 2
            box = np.stack([cx - codes[:, 0], cy - codes[:, 1], cx + codes[:, 2], cy + codes[:, 3]], axis=1)
            boxes.append(np.clip(box, 0, img_size))
            scores.append(flat[candidates])
            labels.append(label)
        boxes, scores, labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
        keep = nms(boxes, scores, labels, NMS_IOU, DETECTIONS_PER_IMAGE)
        found.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    return found


def detection(outputs: np.ndarray, classes: list[str], head: dict, img_size: int,
              sizes: list[tuple[int, int]] | None = None) -> list[dict]:
    """Per image: boxes in the image's own pixels (xyxy), label and score, best first."""
    rows = []
    found_all = fcos_detections(outputs, img_size, [int(g) for g in head["grids"]], [int(s) for s in head["strides"]],
                                float(head.get("score_threshold", 0.2)))
    for i, found in enumerate(found_all):
        h, w = sizes[i] if sizes is not None else (img_size, img_size)
        scale = np.array([w / img_size, h / img_size, w / img_size, h / img_size], dtype=np.float32)
        rows.append({"boxes": [
            {"label": classes[int(label)], "score": round(float(score), 6),
             "box": [round(float(v), 2) for v in box * scale]}
            for box, score, label in zip(found["boxes"], found["scores"], found["labels"], strict=True)]})
    return rows


__all__ = ["PALETTE", "anomaly", "anomaly_map_image", "anomaly_map_png", "classification", "detection",
           "fcos_detections", "mask_image", "mask_png", "nms", "overlap_matrix", "segmentation", "softmax"]
