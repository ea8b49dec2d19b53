"""Turn any image (file, PIL, array; gray, RGBA, 16-bit, any size) into an RGB uint8 array (3, H, W).

numpy and Pillow only: the device side decodes with it; ``petah.data.images`` hands the same
arrays to torch.

Two input policies live here:

* **Size.** A file whose header claims more than ``MAX_IMAGE_PIXELS`` pixels is refused before
  it is decoded (``PETAH_MAX_IMAGE_PIXELS`` overrides the limit). Every backbone resizes its input
  to a few hundred pixels, so a huge image costs seconds and gigabytes for nothing, and a tiny
  file can claim a huge size (a decompression bomb). 40 MP keeps every ordinary camera frame
  (industrial cameras and microscope sensors are 5-25 MP, phone photos 12-48 MP are the largest
  common case) and refuses a 12000 x 12000 image (144 MP: 20 s and 3 GB to decode and convert).
  PIL's own bomb checks (a warning above ~89 MP, an error above ~179 MP) come out as the same
  one-line ``PetahError``.
* **Intensity** of images deeper than 8 bits (16-bit integer, 32-bit float): ``dtype`` scales by
  the type's full range (a 16-bit value v becomes v / 65535); ``range`` stretches each image's own
  min..max to 0..255; ``percentile`` stretches each image's 0.5..99.5 percentiles to 0..255 and
  clips the rest (robust to a few hot or dead pixels). 8-bit images are never changed by the
  mode. A 12-bit camera or a dim fluorescence image saved as 16-bit uses a small part of the
  range, and ``dtype`` turns it almost black: petah warns once when it sees that.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from rich.console import Console

from petah.errors import PetahError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}

MAX_IMAGE_PIXELS = 40_000_000  # see the module doc; PETAH_MAX_IMAGE_PIXELS overrides it
INTENSITY_MODES = ("dtype", "range", "percentile")
# Measured (benchmarks/intensity_modes.py, results/intensity-modes-2026-12-01.json; val mIoU, petah plan,
# 48 images, 8 epochs, 32 px, random-init efficientformerv2_s0):
#   nuclei (fluorescence-like, 0..235): 8-bit 0.844; as 16-bit: dtype 0.428, range 0.850, percentile 0.851;
#     with one hot pixel (4095): range 0.428, percentile 0.851; full-range 16-bit: dtype 0.844, others as above.
#   levels (absolute brightness is the label, bright vs dim blobs): 8-bit 0.806; 16-bit low-range: dtype 0.289,
#     range 0.532, percentile 0.532; hot pixel: range 0.289, percentile 0.534; full-range 16-bit: dtype 0.806.
# No mode wins both: per-image stretching matches 8-bit on low-range data (dtype loses half the mIoU) but costs
# 0.27 where the absolute level is the label. percentile is the default: 12-bit and low-signal cameras in 16-bit
# containers are the common 16-bit input (microscopy tools normalise the same way: CSBDeep/StarDist, Cellpose),
# it never loses to range and survives hot pixels (range does not); radiometric data wants --intensity dtype.
DEFAULT_INTENSITY = "percentile"
PERCENTILES = (0.5, 99.5)
LOW_RANGE_FRACTION = 1 / 16  # a 16-bit image whose values all lie below 4096 (12 bits) is warned about
_stderr = Console(stderr=True)
_warned_low_range = False  # the warning is given once per process, not once per image


def max_image_pixels() -> int:
    """The pixel limit: ``PETAH_MAX_IMAGE_PIXELS`` when set, else ``MAX_IMAGE_PIXELS``."""
    value = os.environ.get("PETAH_MAX_IMAGE_PIXELS", "").strip()
    if not value:
        return MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))  # 4e7 is as welcome as 40000000
    except ValueError:
        limit = 0
    if limit <= 0:
        raise PetahError(f"PETAH_MAX_IMAGE_PIXELS must be a positive number of pixels, got {value!r}")
    return limit


def check_intensity(mode: str) -> str:
    if mode not in INTENSITY_MODES:
        raise PetahError(f"intensity (--intensity) must be one of {' | '.join(INTENSITY_MODES)}, got {mode!r}")
    return mode


def _stretch(arr: np.ndarray, mode: str) -> np.ndarray:
    """Per-image intensity window -> 0..1 (all channels together, so colours keep their balance)."""
    x = arr.astype(np.float32)
    if x.size == 0:
        return x
    lo, hi = float(x.min()), float(x.max())
    if mode == "percentile":
        plo, phi = (float(v) for v in np.percentile(x, PERCENTILES))
        if phi > plo:  # an almost flat image (e.g. 99.5 % background) falls back to min..max
            lo, hi = plo, phi
    if hi <= lo:  # a constant image carries no contrast to stretch
        return np.zeros_like(x)
    return (x - lo) / (hi - lo)


def _warn_low_range(arr: np.ndarray, top: float, source: str) -> None:
    global _warned_low_range
    if _warned_low_range or top < 65535 or arr.size == 0:
        return
    peak = int(arr.max())
    if peak >= top * LOW_RANGE_FRACTION:
        return
    _warned_low_range = True
    _stderr.print(f"[yellow]warning:[/yellow] {source} is a 16-bit image whose values use only 0..{peak} of 0..65535; "
                  "scaled by its dtype it is almost black (adapt with --intensity percentile or range)",
                  highlight=False, soft_wrap=True)  # one line, however long the path


def array_to_rgb(array: np.ndarray, intensity: str = "dtype", source: str = "an image array") -> np.ndarray:
    """(H, W), (H, W, 1|3|4) array of any numeric dtype -> (3, H, W) uint8.

    uint8 and bool arrays are taken as they are. Deeper ones follow ``intensity`` (see the module
    doc); under ``dtype``, integer arrays are scaled by their dtype's range (16-bit stays 16-bit
    until here: PIL's ``convert("RGB")`` would clip it) and float arrays are taken as 0..1.
    ``source`` names the image in the low-range warning.
    """
    check_intensity(intensity)
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4):
        raise PetahError(f"image array of shape {arr.shape} is not (H, W[, C])")
    if arr.shape[-1] in (2, 4):  # drop alpha
        arr = arr[..., :-1]
    if arr.dtype == np.uint8:
        out = arr
    elif arr.dtype == bool:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating):
        if intensity != "dtype":
            scaled = _stretch(arr, intensity)
        elif np.issubdtype(arr.dtype, np.integer):
            top = 65535.0 if arr.max(initial=0) > 255 or arr.dtype.itemsize >= 2 else 255.0
            _warn_low_range(arr, top, source)
            scaled = arr.astype(np.float64) / top  # float64 as before: the same bytes for every image
        else:
            scaled = arr.astype(np.float64)
        out = np.clip(scaled * 255.0 + 0.5, 0, 255).astype(np.uint8)
    else:
        raise PetahError(f"image array of dtype {arr.dtype} is not supported")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def pil_to_rgb(image: Image.Image, intensity: str = "dtype", source: str = "an image") -> np.ndarray:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return array_to_rgb(np.asarray(image, dtype=np.uint16), intensity, source)
    if image.mode == "I":  # 32-bit int container, in practice 16-bit data
        return array_to_rgb(np.clip(np.asarray(image), 0, 65535).astype(np.uint16), intensity, source)
    if image.mode == "F":
        arr = np.asarray(image, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else (255.0 if arr.max() <= 255 else 65535.0)
        return array_to_rgb(arr / top, intensity, source)
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    return array_to_rgb(np.asarray(image.convert("RGBA" if has_alpha else "RGB")))  # alpha is dropped there


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.4g} MP"


def _refuse_huge(image: Image.Image, path: Path | str) -> None:
    """Before decoding: the header's size against the limit."""
    width, height = image.size
    limit = max_image_pixels()
    if width * height > limit:
        raise PetahError(f"cannot read image {path}: {width}x{height} px ({_megapixels(width * height)}) is over "
                         f"petah's limit of {_megapixels(limit)} (PETAH_MAX_IMAGE_PIXELS raises it)")


def load_image(path: str | Path, intensity: str = DEFAULT_INTENSITY) -> np.ndarray:
    """An image file -> (3, H, W) uint8; any problem (unreadable, too large) is a one-line ``PetahError``."""
    return load_image_modes(path, (intensity,))[intensity]


def load_image_modes(path: str | Path | bytes, intensities: tuple[str, ...], name: str | None = None
                     ) -> dict[str, np.ndarray]:
    """An image file (or its bytes, e.g. an upload, named ``name`` in errors) decoded once, as
    (3, H, W) uint8 under each intensity mode (tasks trained with different modes share one read)."""
    if isinstance(path, bytes | bytearray | memoryview):
        source, path = io.BytesIO(path), name or "image"
    else:
        source = path = Path(path)
    for intensity in intensities:
        check_intensity(intensity)
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit; petah's limit (checked next) is the policy that counts.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _refuse_huge(image, path)
                image.load()
                return {intensity: pil_to_rgb(image, intensity, str(path)) for intensity in intensities}
    except Image.DecompressionBombError as exc:  # above PIL's hard ceiling, raised while opening
        raise PetahError(f"cannot read image {path}: {str(exc).splitlines()[0]} "
                         f"(over petah's limit of {_megapixels(max_image_pixels())})") from exc
    except UnidentifiedImageError:
        raise PetahError(f"cannot read image {path}: not an image format petah can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PetahError(f"cannot read image {path}: {reason}") from exc


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of ``root/<class>/<image>`` (hidden ones left out), sorted."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_class_images(folders: list[Path], classes: list[str], intensity: str) -> tuple[list[np.ndarray], list[int]]:
    """Every image under each class folder (recursively, sorted) and its class index in ``classes``;
    a class folder without images is refused."""
    images, labels = [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise PetahError(f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for file in files:
            images.append(load_image(file, intensity))
            labels.append(classes.index(folder.name))
    return images, labels


@functools.lru_cache(maxsize=64)
def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of an antialiased bilinear (triangle filter) resize, as torch's
    ``interpolate(..., antialias=True)`` and Pillow compute them (align_corners=False). Why not
    Pillow's own resize: it rounds to uint8 between the two passes; the build side resizes float
    images, and the device must give the graph the same numbers."""
    scale = size_in / size_out
    support = max(scale, 1.0)  # the triangle's half-width, widened when shrinking (antialiasing)
    inverse = 1.0 / support
    weights = np.zeros((size_out, size_in), dtype=np.float64)
    for i in range(size_out):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)
        stop = min(int(center + support + 0.5), size_in)
        taps = np.arange(start, stop)
        w = np.clip(1.0 - np.abs((taps - center + 0.5) * inverse), 0.0, None)
        total = w.sum()
        weights[i, start:stop] = w / total if total > 0 else w
    return weights.astype(np.float32)


def resize_float(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, height, width), separable antialiased bilinear."""
    if image.shape[-2:] == (height, width):
        return image
    rows, cols = resize_matrix(image.shape[-2], height), resize_matrix(image.shape[-1], width)
    return np.matmul(np.matmul(rows, image), cols.T)


@dataclass(frozen=True)
class Preprocess:
    """Resize + normalise as a package records it (``preprocessing`` in its manifest)."""

    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # How image files deeper than 8 bits were brought to 8 bits (see the module doc); applied when the
    # files are loaded, not here (this class sees uint8 images). Packages from before it mean "dtype".
    intensity: str = "dtype"

    @classmethod
    def from_dict(cls, data: dict):
        intensity = data.get("intensity", "dtype")
        if intensity not in INTENSITY_MODES:
            raise ValueError(f"intensity must be one of {' | '.join(INTENSITY_MODES)}, got {intensity!r}")
        return cls(int(data["img_size"]), tuple(data["mean"]), tuple(data["std"]), intensity)

    def array(self, image: np.ndarray) -> np.ndarray:
        """(3, H, W) uint8 -> (3, img_size, img_size) float32, normalised."""
        x = resize_float(image.astype(np.float32) / np.float32(255.0), self.img_size, self.img_size)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, dtype=np.float32).reshape(-1, 1, 1)
        return (x - mean) / std

    def array_batch(self, images: list[np.ndarray]) -> np.ndarray:
        return np.stack([self.array(image) for image in images]).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=64)
def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) weights of a plain bilinear resize (align_corners=False, no antialias),
    as torch's ``interpolate(mode="bilinear")`` computes it: what dense answers are resized with."""
    scale = size_in / size_out
    weights = np.zeros((size_out, size_in), dtype=np.float32)
    for i in range(size_out):
        source = max((i + 0.5) * scale - 0.5, 0.0)
        low = min(int(source), size_in - 1)
        high = min(low + 1, size_in - 1)
        frac = source - low
        weights[i, low] += 1.0 - frac
        weights[i, high] += frac
    return weights


def resize_bilinear(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) float maps -> (..., height, width), plain bilinear as torch resizes dense answers."""
    if maps.shape[-2:] == (height, width):
        return maps
    return np.matmul(np.matmul(bilinear_matrix(maps.shape[-2], height), maps), bilinear_matrix(maps.shape[-1], width).T)


@functools.lru_cache(maxsize=64)
def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    """The source index of each output index in torch's ``nearest-exact`` resize (torchvision's
    ``InterpolationMode.NEAREST_EXACT``, what the build side resizes masks with): ``floor((i + 0.5)
    * scale)`` with the scale in float32 and the product rounded to float32, as torch computes it."""
    scale = np.float32(size_in) / np.float32(size_out)
    source = ((np.arange(size_out, dtype=np.float64) + 0.5) * np.float64(scale)).astype(np.float32)
    return np.minimum(np.floor(source).astype(np.int64), size_in - 1)


def resize_nearest(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """(..., H, W) label map -> (..., height, width), nearest-exact as torch resizes masks (no value is mixed)."""
    if mask.shape[-2:] == (height, width):
        return mask
    return mask[..., nearest_indices(mask.shape[-2], height)[:, None], nearest_indices(mask.shape[-1], width)]
