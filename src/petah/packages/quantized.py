"""LoRA factors stored in int8 (``adapter_dtype`` ``int8``, format 4), and reading them back.

A rank-r update is a sum of r rank-one terms ``b_i a_iᵀ`` (``a_i`` a row of ``lora_A``, ``b_i`` a
column of ``lora_B``); each factor of each term gets its own symmetric int8 scale, stored as
float32 beside it (``<module>.lora_A_scale`` / ``lora_B_scale``, r values each). Per rank term,
not per output row of B: at ranks 1-2 a scale per row of B would cost as many bytes as the int8
values it saves. float32 scales because trained B factors sit near 1e-4, where float16 is subnormal.
Channel scales stay float16 (one value per channel, and a device multiplies whole weights by them).

Numpy only: the device merges what this reads.
"""

from __future__ import annotations

import numpy as np

from petah.errors import PetahError

QUANTIZED_DTYPES = ("int8",)
LORA_FACTORS = {"lora_A": 0, "lora_B": 1}  # which axis of each factor is the rank
SCALE_SUFFIX = "_scale"
LEVELS = 127  # symmetric: -127..127


def scale_names(module: str) -> tuple[str, str]:
    return tuple(f"{module}.{factor}{SCALE_SUFFIX}" for factor in LORA_FACTORS)


def quantize_factor(array: np.ndarray, factor: str) -> tuple[np.ndarray, np.ndarray]:
    """(int8 values, float32 scale per rank term) of one LoRA factor."""
    axis = LORA_FACTORS[factor]
    values = np.moveaxis(np.asarray(array, dtype=np.float32), axis, 0)
    rows = values.reshape(values.shape[0], -1)
    scale = (np.abs(rows).max(axis=1, initial=0.0) / LEVELS).astype(np.float32)
    steps = np.where(scale > 0, scale, 1.0)[:, None]
    q = np.clip(np.rint(rows / steps), -LEVELS, LEVELS).astype(np.int8).reshape(values.shape)
    return np.ascontiguousarray(np.moveaxis(q, 0, axis)), scale


def dequantize_factor(q: np.ndarray, scale: np.ndarray, factor: str, origin: str, name: str) -> np.ndarray:
    """float32 values of a stored int8 factor; its scale is checked first (the package is untrusted)."""
    axis = LORA_FACTORS[factor]
    if q.dtype != np.int8 or q.ndim <= axis:
        raise PetahError(f"{origin}: adapter tensor {name} must be int8 with a rank axis, got {q.dtype} {q.shape}")
    rank = q.shape[axis]
    if scale.dtype != np.float32 or scale.shape != (rank,) or not np.all(np.isfinite(scale)):
        raise PetahError(f"{origin}: adapter tensor {name}{SCALE_SUFFIX} must be {rank} finite float32 values")
    shape = [1] * q.ndim
    shape[axis] = rank
    return q.astype(np.float32) * scale.reshape(shape)


def adapter_arrays(package, origin: str | None = None) -> dict[str, np.ndarray]:
    """A package's adapter tensors by ``<module>.<name>`` as numbers to merge: stored floats as they
    are, int8 LoRA factors dequantized to float32 (their scales consumed)."""
    stored = package.section("adapter")
    if package.manifest.adapter_dtype not in QUANTIZED_DTYPES:
        return stored
    origin = origin or f"package {package.manifest.task.name}"
    out = {}
    for name, value in stored.items():
        factor = name.rpartition(".")[2]
        if factor in LORA_FACTORS:
            out[name] = dequantize_factor(value, stored[f"{name}{SCALE_SUFFIX}"], factor, origin, name)
        elif not factor.endswith(SCALE_SUFFIX):
            out[name] = value
    return out


__all__ = ["QUANTIZED_DTYPES", "adapter_arrays", "dequantize_factor", "quantize_factor", "scale_names"]
