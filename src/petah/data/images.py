"""Turn any image (file, PIL, array; gray, RGBA, 16-bit, any size) into an RGB uint8 tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from petah.errors import PetahError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def array_to_rgb(array: np.ndarray) -> torch.Tensor:
    """(H, W), (H, W, 1|3|4) array of any numeric dtype -> (3, H, W) uint8.

    Integer arrays are scaled by their dtype's range (16-bit stays 16-bit until here: PIL's
    ``convert("RGB")`` would clip it); float arrays are taken as 0..1.
    """
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise PetahError(f"image array of shape {arr.shape} is not (H, W[, C])")
    if arr.shape[-1] in (2, 4):  # drop alpha
        arr = arr[..., :-1]
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.integer):
        top = 65535.0 if arr.max(initial=0) > 255 or arr.dtype.itemsize >= 2 else 255.0
        out = np.clip(arr.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating) or arr.dtype == bool:
        out = np.clip(arr.astype(np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise PetahError(f"image array of dtype {arr.dtype} is not supported")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()


def pil_to_rgb(image: Image.Image) -> torch.Tensor:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return array_to_rgb(np.asarray(image, dtype=np.uint16))
    if image.mode == "I":  # 32-bit int container, in practice 16-bit data
        return array_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16))
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        return array_to_rgb(arr / top)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return array_to_rgb(np.asarray(image.convert("RGBA" if has_alpha else "RGB")))  # alpha is dropped there


def load_image(path: str | Path) -> torch.Tensor:
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            return pil_to_rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise PetahError(f"cannot read image {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
