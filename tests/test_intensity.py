"""Input policies of image loading: huge images refused before decoding, and how images deeper than
8 bits become 8-bit (dtype | range | percentile), recorded in packages and applied by predict."""

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import conftest
from conftest import one_json, write_pattern_folder
from conftest import petah_process as petah
from petah import api
from petah import imaging as images_module
from petah.backbones import create_backbone
from petah.data import DEFAULT_INTENSITY, INTENSITY_MODES, Preprocess, array_to_rgb, load_dataset, load_image
from petah.errors import PetahError
from petah.packages.format import read_package
from petah.train import TrainConfig


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims width x height pixels (its data is one row: a decoder would fail late)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def _one_line_error(excinfo, *fragments):
    message = str(excinfo.value)
    assert "\n" not in message and message.startswith("cannot read image"), message
    for fragment in fragments:
        assert fragment in message, message


# --- huge images ---------------------------------------------------------------------------------
def test_a_header_over_the_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    bomb = _png_claiming(tmp_path / "bomb.png", 12000, 12000)  # 144 MP, a few hundred bytes

    def no_decoding(self):  # decoding would take 20 s and 3 GB: it must not start
        raise AssertionError("the image was decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    with pytest.raises(PetahError) as excinfo:
        load_image(bomb)
    _one_line_error(excinfo, "bomb.png", "12000x12000 px (144 MP)", "limit of 40 MP", "PETAH_MAX_IMAGE_PIXELS")


def test_the_limit_follows_the_constant_and_the_environment(tmp_path, monkeypatch):
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(big)
    assert load_image(big).shape == (3, 20, 30)
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 500)
    with pytest.raises(PetahError) as excinfo:
        load_image(big)
    _one_line_error(excinfo, "big.png", "30x20 px", "limit of 0.0005 MP")
    monkeypatch.setenv("PETAH_MAX_IMAGE_PIXELS", "600")  # the environment wins over the constant
    assert load_image(big).shape == (3, 20, 30)
    monkeypatch.setenv("PETAH_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(PetahError, match="PETAH_MAX_IMAGE_PIXELS must be a positive number"):
        load_image(big)


def test_pils_own_bomb_error_is_the_same_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PETAH_MAX_IMAGE_PIXELS", "1e9")  # petah would allow it; PIL refuses above ~179 MP while opening
    bomb = _png_claiming(tmp_path / "huge.png", 20000, 20000)
    with pytest.raises(PetahError) as excinfo:
        load_image(bomb)
    _one_line_error(excinfo, "huge.png", "could be decompression bomb", "limit of 1000 MP")


# --- intensity modes on arrays ------------------------------------------------------------------
def _low_range(hot: bool = False) -> np.ndarray:
    """A 16-bit image using 0..235 (a dim fluorescence frame), optionally with one hot pixel."""
    array = np.tile(np.linspace(0, 235, 40).round().astype(np.uint16), (40, 1))
    if hot:
        array[0, 0] = 4095
    return array


def test_the_three_modes_on_a_low_range_16bit_array():
    dtype = array_to_rgb(_low_range(), "dtype")
    assert dtype.max() <= 1  # 235 / 65535: black, the bug this fixes
    ranged = array_to_rgb(_low_range(), "range")
    assert ranged.min() == 0 and ranged.max() == 255
    eight = array_to_rgb(_low_range().astype(np.uint8))
    assert (ranged.int() - eight.int() * 255 / 235).abs().max() <= 1  # min..max stretched to 0..255
    # A hot pixel squeezes min..max back towards black; the percentiles ignore it.
    assert array_to_rgb(_low_range(hot=True), "range")[:, 1:].max() < 20
    robust = array_to_rgb(_low_range(hot=True), "percentile")
    assert robust[0, 0, 0] == 255 and robust[:, 1:].max() >= 250 and robust.min() == 0


def test_8bit_images_are_unaffected_by_the_mode(tmp_path):
    values = np.random.default_rng(0).integers(30, 200, (12, 10), dtype=np.uint8)
    path = tmp_path / "eight.png"
    Image.fromarray(values).save(path)
    first = load_image(path, "dtype")
    for mode in INTENSITY_MODES:
        assert torch.equal(load_image(path, mode), first)
        assert torch.equal(array_to_rgb(values, mode), first)


def test_full_range_16bit_under_dtype_equals_its_8bit_copy_and_edge_cases():
    values = np.random.default_rng(1).integers(0, 256, (8, 8)).astype(np.uint8)
    assert torch.equal(array_to_rgb(values.astype(np.uint16) * 257, "dtype"), array_to_rgb(values))
    flat = np.full((4, 4), 300, np.uint16)
    for mode in ("range", "percentile"):  # no contrast: black, not a division by zero
        assert array_to_rgb(flat, mode).max() == 0
    floats = np.linspace(0.0, 1.0, 16).reshape(4, 4)
    assert array_to_rgb(floats, "dtype").max() == 255 and array_to_rgb(floats * 0.1, "range").max() == 255
    with pytest.raises(PetahError, match=re.escape("dtype | range | percentile")):
        array_to_rgb(values, "auto")
    with pytest.raises(PetahError, match="got 'auto'"):
        load_dataset("builtin:digits", intensity="auto")


def test_low_range_16bit_under_dtype_warns_once_on_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(images_module, "_warned_low_range", False)
    for name in ("a.png", "b.png"):
        Image.fromarray(_low_range()).save(tmp_path / name)
    Image.fromarray(_low_range() * 250).save(tmp_path / "full.png")
    load_image(tmp_path / "full.png", "dtype")
    load_image(tmp_path / "a.png", "range")
    assert capsys.readouterr().err == ""  # full range, or a stretching mode: nothing to say
    load_image(tmp_path / "a.png", "dtype")
    load_image(tmp_path / "b.png", "dtype")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "a.png" in lines[0] and "0..235 of 0..65535" in lines[0] and "--intensity" in lines[0]


def test_preprocess_records_the_mode_and_old_manifests_mean_dtype():
    pre = {"img_size": 32, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert Preprocess.from_dict(pre).intensity == "dtype"
    assert Preprocess.from_dict({**pre, "intensity": "percentile"}).intensity == "percentile"
    with pytest.raises(ValueError, match="intensity"):
        Preprocess.from_dict({**pre, "intensity": "gamma"})


# --- loaders ---------------------------------------------------------------------------------------
def _write_16bit_sets(root):
    """The same low-range 16-bit images as a class folder, a mask folder and a COCO set."""
    rng = np.random.default_rng(0)
    pictures = [(rng.integers(0, 120, (16, 16)) + 100 * (i % 2)).astype(np.uint16) for i in range(6)]
    for i, picture in enumerate(pictures):
        (root / "cls" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / "cls" / f"c{i % 2}" / f"{i}.png")
        for sub in ("seg/images", "seg/masks", "coco/images"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(root / "seg" / "images" / f"{i}.png")
        Image.fromarray((picture > 150).astype(np.uint8), mode="L").save(root / "seg" / "masks" / f"{i}.png")
        Image.fromarray(picture).save(root / "coco" / "images" / f"{i}.png")
    (root / "seg" / "classes.txt").write_text("dark\nbright\n")
    coco = {"images": [{"id": i, "file_name": f"{i}.png", "width": 16, "height": 16} for i in range(6)],
            "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [2, 2, 8, 8]} for i in range(6)],
            "categories": [{"id": 1, "name": "thing"}]}
    (root / "coco" / "annotations.json").write_text(json.dumps(coco))
    return [root / "cls", root / "seg", root / "coco"]


def test_every_file_loader_applies_and_records_the_mode(tmp_path):
    for folder in _write_16bit_sets(tmp_path):
        for mode in INTENSITY_MODES:
            train, val = load_dataset(str(folder), val_split=0.5, intensity=mode)
            assert train.intensity == val.intensity == mode, folder
            brightest = max(int(image.max()) for image in [*train.images, *val.images])
            assert brightest <= 1 if mode == "dtype" else brightest == 255, (folder, mode)
            assert train.subset([0]).intensity == mode
    train, _ = load_dataset("builtin:digits", intensity="range")
    assert train.intensity == "range" and load_dataset("builtin:digits")[0].intensity == DEFAULT_INTENSITY


# --- the default, end to end -----------------------------------------------------------------------
def _squares(count=24, seed=0):
    """test_dense_learning's toy segmentation set, values 0..220: noise 0..80 and a bright square."""
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(count):
        h, w = 24 + 4 * (i % 3), 28
        image = rng.integers(0, 80, (h, w))
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[4:14, 6:16] = 1
        image[mask == 1] = 220
        pairs.append((image, mask))
    return pairs


def _write_squares(root, pairs, dtype):
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("background\nsquare\n")
    for i, (image, mask) in enumerate(pairs):
        Image.fromarray(image.astype(dtype)).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
    return root


def test_low_range_16bit_learns_as_well_as_its_8bit_copy_under_the_default(tmp_path):
    """The issue's case: 16-bit files using 0..220 of their range. Under the default mode they
    train as well as the same images saved as 8-bit; the old behaviour (dtype) is far worse. The
    CLI's eval reads the mode from the package: it reproduces adapt's validation metric."""
    from petah.backbones import save_backbone

    pairs = _squares()
    config = TrainConfig(epochs=12, batch_size=6, lr=3e-3, head_lr=1e-2, progress=False)
    torch.manual_seed(0)
    save_backbone(create_backbone("efficientformerv2_s0", 32), tmp_path / "bb.safetensors")
    backbone = create_backbone(weights=str(tmp_path / "bb.safetensors"))
    scores = {}
    for name, dtype, mode in (("8bit", np.uint8, DEFAULT_INTENSITY), ("16bit", np.uint16, DEFAULT_INTENSITY),
                              ("16bit-dtype", np.uint16, "dtype")):
        folder = tmp_path / name.removesuffix("-dtype")
        if not folder.exists():
            _write_squares(folder, pairs, dtype)
        train, val = load_dataset(str(folder), val_split=0.25, intensity=mode)
        torch.manual_seed(0)
        result = api.adapt(backbone, train, val, config=config, task_name="squares", adapter_dtype="float32",
                           output=tmp_path / f"{name}.petah")
        assert result.package.manifest.preprocessing["intensity"] == mode
        scores[name] = result.metrics["mIoU"]
    assert scores["8bit"] > 0.7, scores
    assert abs(scores["16bit"] - scores["8bit"]) < 0.05, scores
    assert scores["16bit-dtype"] < scores["8bit"] - 0.2, scores
    # eval loads the images as the package recorded ("dtype" here, not the default): adapt's metric again
    report = one_json(petah("eval", tmp_path / "16bit-dtype.petah", tmp_path / "16bit", "-b",
                            tmp_path / "bb.safetensors", "--val-split", "0.25", "--json"))
    assert report["metrics"]["mIoU"] == pytest.approx(scores["16bit-dtype"], abs=1e-6)


# --- packages record the mode; predict applies it -------------------------------------------------
@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A backbone file and a classification package adapted in "range" mode (a couple of steps)."""
    from petah.backbones import save_backbone

    root = tmp_path_factory.mktemp("intensity")
    folder = write_pattern_folder(root / "shapes", 4, seed=7)
    torch.manual_seed(0)
    save_backbone(create_backbone("efficientformerv2_s0", 32), root / "bb.safetensors")
    backbone = create_backbone(weights=str(root / "bb.safetensors"))
    train, val = load_dataset(str(folder), val_split=0.25, intensity="range")
    result = api.adapt(backbone, train, val, config=TrainConfig(max_steps=2, batch_size=4, progress=False),
                       task_name="shapes", adapter_dtype="float32", output=root / "shapes.petah")
    return {"root": root, "backbone": backbone, "bb_file": root / "bb.safetensors", "package": root / "shapes.petah",
            "result": result}


def test_the_package_records_the_mode_and_predict_applies_it(shapes, tmp_path):
    assert read_package(shapes["package"]).manifest.preprocessing["intensity"] == "range"
    low = _low_range()
    low[5:30, 10:20] = 200
    Image.fromarray(low).save(tmp_path / "deep.png")
    Image.fromarray(array_to_rgb(low, "range")[0].numpy()).save(tmp_path / "stretched.png")  # what "range" sees
    files = [tmp_path / "deep.png", tmp_path / "stretched.png"]
    first, second = api.predict_files(shapes["backbone"], [shapes["package"]], files)
    assert first["tasks"]["shapes"] == second["tasks"]["shapes"]
    # The same package recorded as "dtype" (as packages from before the key) sees the 16-bit file black.
    package = read_package(shapes["package"])
    package.manifest.preprocessing = {k: v for k, v in package.manifest.preprocessing.items() if k != "intensity"}
    api.save_package(package, tmp_path / "old.petah")
    first, second = api.predict_files(shapes["backbone"], [tmp_path / "old.petah"], files)
    assert first["tasks"]["shapes"] != second["tasks"]["shapes"]


def test_adapt_takes_intensity_and_records_it(shapes, tmp_path):
    folder = shapes["root"] / "shapes"
    proc = petah("adapt", folder, "-b", shapes["bb_file"], "-o", tmp_path / "x.petah", "--val-split", "0.25",
                 "--intensity", "gamma", ok=False)
    assert proc.returncode != 0 and len(proc.stderr.strip().splitlines()) == 1 and "got 'gamma'" in proc.stderr
    petah("adapt", folder, "-b", shapes["bb_file"], "-o", tmp_path / "r.petah", "--val-split", "0.25",
          "--intensity", "dtype", "--max-steps", "1", "--batch-size", "4", "--json")
    assert read_package(tmp_path / "r.petah").manifest.preprocessing["intensity"] == "dtype"


def test_predict_jsonl_reports_a_huge_image_and_goes_on(shapes, tmp_path, monkeypatch):
    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(conftest.make_pattern(2, size=48)).save(folder / "a_huge.png")  # 2304 px: over the limit below
    Image.fromarray(conftest.make_pattern(2, size=24)).save(folder / "b_small.png")  # 576 px
    monkeypatch.setitem(conftest.CLI_ENV, "PETAH_MAX_IMAGE_PIXELS", "1000")
    proc = petah("predict", folder, "-b", shapes["bb_file"], "-p", shapes["package"], "--jsonl", ok=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 2, proc.stdout + proc.stderr
    assert lines[0]["image"].endswith("a_huge.png") and "48x48 px" in lines[0]["error"]
    assert "PETAH_MAX_IMAGE_PIXELS" in lines[0]["error"] and "\n" not in lines[0]["error"]
    assert lines[1]["image"].endswith("b_small.png") and lines[1]["tasks"]["shapes"]["label"]
