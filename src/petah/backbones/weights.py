"""Weight files, the backbone fingerprint, and resizing of EfficientFormerV2 bias tables."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from petah.backbones.tensors import to_numpy
from petah.errors import PetahError
from petah.packages.tensors import tensors_sha256 as numpy_tensors_sha256


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor in sorted key order (the canonical order of the project; defined
    and computed by ``petah.packages.tensors``, which the device side shares)."""
    return numpy_tensors_sha256({key: to_numpy(tensor) for key, tensor in tensors.items()})


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a safetensors file or a torch state dict (weights only, never arbitrary pickle)."""
    path = Path(path)
    if not path.is_file():
        raise PetahError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as exc:
        raise PetahError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from exc
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PetahError(f"weights file {path} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resize_bias_table(table: torch.Tensor, target_len: int) -> torch.Tensor:
    """Interpolate a (heads, R*R) relative-position bias table to (heads, r*r).

    EfficientFormerV2 indexes its `attention_biases` by (|dy|, |dx|) on an R x R grid, so the
    table is a small image per head; timm has no function for this, hence our own.
    """
    heads, src_len = table.shape
    src, dst = math.isqrt(src_len), math.isqrt(target_len)
    if src * src != src_len or dst * dst != target_len:
        raise PetahError(f"bias table of length {src_len} cannot be resized to {target_len}")
    grid = table.reshape(1, heads, src, src).float()
    out = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)
    return out.reshape(heads, target_len).to(table.dtype)


def adapt_state_dict(
    state: dict[str, torch.Tensor], model: torch.nn.Module, drop_prefixes: tuple[str, ...]
) -> dict[str, torch.Tensor]:
    """Drop classifier keys and resize attention bias tables to the model's input size."""
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        if any(key == p or key.startswith(p + ".") for p in drop_prefixes):
            continue
        target = own.get(key)
        if (
            target is not None
            and key.endswith("attention_biases")
            and value.ndim == 2
            and value.shape != target.shape
            and value.shape[0] == target.shape[0]
        ):
            value = resize_bias_table(value, target.shape[1])
        out[key] = value
    return out
