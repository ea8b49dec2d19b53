import os

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("PETAH_NO_PROGRESS", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_pattern(label: int, size: int = 24, seed: int = 0) -> np.ndarray:
    """Class 0: horizontal stripes, class 1: vertical stripes, class 2: a bright square; plus noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (size, size), dtype=np.int64)
    if label == 0:
        img[::4, :] += 180
    elif label == 1:
        img[:, ::4] += 180
    else:
        img[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] += 180
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture
def image_folder(tmp_path):
    """root/<class>/<n>.png with three visually distinct classes, 12 images each."""
    root = tmp_path / "shapes"
    for label, name in enumerate(["hstripes", "vstripes", "square"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(make_pattern(label, seed=100 * label + i)).save(root / name / f"{i}.png")
    return root
