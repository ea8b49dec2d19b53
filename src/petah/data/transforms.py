"""Preprocessing (resize + normalise, as recorded in packages) and seeded augmentation.

Augmentation draws from an explicit ``torch.Generator`` instead of torchvision's random
transforms (which use the global RNG), so each sample's augmentation is reproducible on its
own, whatever the worker, rank or resume point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from petah import imaging


@dataclass(frozen=True)
class Preprocess(imaging.Preprocess):
    """The recorded preprocessing on torch tensors (training, the torch runtime); the numpy form
    (``array``) is the device side's and gives the same numbers."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.float().div_(255.0)
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            x = TF.resize(x, [self.img_size, self.img_size], antialias=True)
        return TF.normalize(x, list(self.mean), list(self.std))

    def batch(self, images: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([self(img) for img in images])


@dataclass(frozen=True)
class Augment:
    """Random resized crop, optional horizontal flip, brightness / contrast jitter."""

    min_scale: float = 0.6
    hflip: bool = False
    jitter: float = 0.2

    def __call__(self, image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return self.pair(image, None, gen)[0]

    def pair(self, image: torch.Tensor, mask: torch.Tensor | None, gen: torch.Generator):
        """Augment an image and (for dense tasks) its (H, W) mask with the same crop and flip."""
        u = lambda: float(torch.rand((), generator=gen))  # noqa: E731
        _, h, w = image.shape
        area = h * w * (self.min_scale + (1.0 - self.min_scale) * u())
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u())
        ch = max(1, min(h, int(round(math.sqrt(area / ratio)))))
        cw = max(1, min(w, int(round(math.sqrt(area * ratio)))))
        top, left = int(u() * (h - ch + 1)), int(u() * (w - cw + 1))
        out = image[:, top : top + ch, left : left + cw]
        if mask is not None:
            mask = mask[top : top + ch, left : left + cw]
        if self.hflip and u() < 0.5:
            out = out.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
        if self.jitter > 0:
            bright = 1.0 + self.jitter * (2 * u() - 1)
            contrast = 1.0 + self.jitter * (2 * u() - 1)
            x = out.float()
            mean = x.mean()
            x = (x - mean) * contrast + mean * bright
            out = x.clamp_(0, 255).round_().to(torch.uint8)
        return out, mask
