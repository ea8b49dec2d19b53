"""Images as torch tensors for the build side: ``petah.imaging`` decodes (numpy + Pillow, shared
with the device side); this module hands its (3, H, W) uint8 arrays to torch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from petah import imaging
from petah.imaging import (
    DEFAULT_INTENSITY,
    IMAGE_SUFFIXES,
    INTENSITY_MODES,
    MAX_IMAGE_PIXELS,
    check_intensity,
    max_image_pixels,
)


def array_to_rgb(array: np.ndarray, intensity: str = "dtype", source: str = "an image array") -> torch.Tensor:
    return torch.from_numpy(imaging.array_to_rgb(array, intensity, source))


def pil_to_rgb(image: Image.Image, intensity: str = "dtype", source: str = "an image") -> torch.Tensor:
    return torch.from_numpy(imaging.pil_to_rgb(image, intensity, source))


def load_image(path: str | Path, intensity: str = DEFAULT_INTENSITY) -> torch.Tensor:
    return torch.from_numpy(imaging.load_image(path, intensity))


def load_image_modes(path: str | Path | bytes, intensities: tuple[str, ...], name: str | None = None
                     ) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v) for k, v in imaging.load_image_modes(path, intensities, name).items()}


__all__ = ["DEFAULT_INTENSITY", "IMAGE_SUFFIXES", "INTENSITY_MODES", "MAX_IMAGE_PIXELS", "array_to_rgb",
           "check_intensity", "load_image", "load_image_modes", "max_image_pixels", "pil_to_rgb"]
