"""Multi-scale features for dense tasks, from timm's ``forward_intermediates`` on the unchanged model.

``features_only=True`` would rebuild the model with renamed modules, and adapter keys would no
longer match; ``forward_intermediates`` runs the very model the adapters were injected into.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from petah.errors import PetahError

DENSE_STRIDES = (8, 16, 32)


def feature_levels(model: nn.Module) -> list[dict]:
    """timm's per-stage feature info: ``{"num_chs", "reduction", "module"}`` for each stage."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise PetahError(f"{type(model).__name__} gives no multi-scale features (timm forward_intermediates)")
    return [dict(level) for level in info]


def level_indices(model: nn.Module, strides: tuple[int, ...] = DENSE_STRIDES) -> list[int]:
    """For each wanted stride, the last stage with that reduction (the deepest features at that scale)."""
    levels = feature_levels(model)
    indices = []
    for stride in strides:
        found = [i for i, level in enumerate(levels) if level["reduction"] == stride]
        if not found:
            have = sorted({level["reduction"] for level in levels})
            raise PetahError(f"{type(model).__name__} has no features at stride {stride} (it has {have})")
        indices.append(found[-1])
    return indices


def multi_scale_features(model: nn.Module, x: torch.Tensor,
                         strides: tuple[int, ...] = DENSE_STRIDES) -> list[torch.Tensor]:
    """Feature maps (N, C, H/stride, W/stride), one per stride, from a single forward pass."""
    indices = level_indices(model, strides)
    maps = model.forward_intermediates(x, indices=sorted(set(indices)), intermediates_only=True)
    by_index = dict(zip(sorted(set(indices)), maps, strict=True))
    return [by_index[i] for i in indices]
