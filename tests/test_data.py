import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from petah.data import Augment, Preprocess, load_dataset, load_image, load_image_folder
from petah.data.builtin import fashion_mnist
from petah.errors import PetahError


def _save(tmp_path, name, image):
    path = tmp_path / name
    image.save(path)
    return path


def test_grayscale_rgba_and_sizes(tmp_path):
    gray = load_image(_save(tmp_path, "g.png", Image.fromarray(np.full((5, 7), 200, np.uint8))))
    assert gray.shape == (3, 5, 7) and gray.dtype == torch.uint8 and gray.max() == 200
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 255, 10
    out = load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA")))
    assert out.shape == (3, 4, 4) and out[0].max() == 255


def test_16bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16)
    out = load_image(_save(tmp_path, "d.png", Image.fromarray(values)), intensity="dtype")
    assert out[0, 0].tolist() == [0, 4, 128, 255]  # PIL's convert("RGB") would give 255 for all but 0


def test_unreadable_file_is_reported_by_path(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(PetahError, match="broken.png"):
        load_image(bad)


def test_folder_layout_and_val_split(image_folder):
    data = load_image_folder(image_folder)
    assert data.classes == ["hstripes", "square", "vstripes"] and len(data) == 36
    train, val = load_dataset(str(image_folder), val_split=0.25, seed=1)
    assert len(train) + len(val) == 36 and len(val) == 9
    assert sorted(val.labels.tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_folder_with_train_and_val(image_folder, tmp_path):
    import shutil

    root = tmp_path / "split"
    shutil.copytree(image_folder, root / "train")
    shutil.copytree(image_folder, root / "val")
    train, val = load_dataset(str(root))
    assert train.classes == val.classes and len(val) == 36


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(PetahError, match="--val-split"):
        load_dataset(str(image_folder))
    (image_folder / "empty").mkdir()
    with pytest.raises(PetahError, match="holds no images"):
        load_image_folder(image_folder)
    with pytest.raises(PetahError, match="not found"):
        load_dataset(str(tmp_path / "nowhere"))


def test_preprocess_and_seeded_augment():
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    pre = Preprocess(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert pre(image).shape == (3, 32, 32)
    aug = Augment(hflip=True)
    a = aug(image, torch.Generator().manual_seed(3))
    b = aug(image, torch.Generator().manual_seed(3))
    c = aug(image, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not (a.shape == c.shape and torch.equal(a, c))


def test_fashion_mnist_reader_on_local_idx_files(tmp_path):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for prefix in ("train", "t10k"):
        with gzip.open(tmp_path / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(b"\0" * 16 + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(b"\0" * 8 + bytes([3, 9]))
    train, test = fashion_mnist(tmp_path)
    assert len(train) == 2 and train.labels.tolist() == [3, 9] and train.classes[9] == "boot"
    assert torch.equal(train.images[1][0], torch.from_numpy(images[1]))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(PetahError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist(tmp_path)


@pytest.mark.parametrize("name,classes", [("digits", 10), ("faces", 2), ("textures", 3)])
def test_builtin_datasets(name, classes):
    train, val = load_dataset(f"builtin:{name}")
    assert len(train.classes) == classes and len(val) > 0
    assert set(val.labels.tolist()) == set(range(classes))
