"""Answers from a graph's outputs, in numpy: what the device engine returns, and what the torch
task kinds return too (one definition of each answer)."""

from __future__ import annotations

import numpy as np


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


__all__ = ["classification", "softmax"]
