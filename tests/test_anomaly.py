"""Anomaly detection from good parts only: the memory bank on the shared backbone, its threshold,
maps, the package round trip, ONNX parity, and the data layouts with their errors."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import one_json, petah_process
from petah import api
from petah.backbones import create_backbone, demo_backbone_path
from petah.data import load_dataset
from petah.data.builtin import surface_anomalies
from petah.errors import PetahError
from petah.packages import encode_package, read_package, write_package
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.runtime.attach import torch_section
from petah.tasks.anomaly import (
    AnomalyConfig,
    anomaly_map_png,
    bank_rows,
    choose_threshold,
    coreset_indices,
)


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(weights=str(demo_backbone_path()))


@pytest.fixture(scope="module")
def surfaces():
    return surface_anomalies(train_count=48, val_good=12, val_defective=24)


@pytest.fixture(scope="module")
def fitted(backbone, surfaces, tmp_path_factory):
    train, val = surfaces
    result = api.adapt(backbone, train, val, task_name="surface", anomaly=AnomalyConfig(coreset_ratio=0.05))
    path = tmp_path_factory.mktemp("anomaly") / "surface.petah"
    write_package(path, result.package)
    return result, path


def test_learns_from_good_images_only_and_finds_painted_defects(backbone, surfaces, fitted):
    result, _path = fitted
    train, _val = surfaces
    assert not train.labels.any()  # nothing anomalous was seen
    metrics = result.metrics
    assert metrics["image_auroc"] > 0.75 and metrics["pixel_auroc"] > 0.75, metrics  # chance: 0.5
    manifest = result.package.manifest
    assert manifest.task.kind == "anomaly" and manifest.head["method"] == "patchcore"
    assert manifest.plan.targets == () and result.package.section("adapter") == {}  # no backbone copy, no adapter
    bank = torch_section(result.package, "head")["bank"]
    assert bank.dtype == torch.float16 and bank.shape[0] == manifest.training["bank_rows"]
    assert len(encode_package(result.package)) < 0.05 * backbone.weights_bytes


@pytest.mark.parametrize("scores, anomalous, max_false_reject, want, rule", [
    ([0.1, 0.2, 0.3, 0.4, 0.9, 0.8], [0, 0, 0, 0, 1, 1], None, 0.4, "best F1"),  # separable: between the groups
    ([0.1, 0.5, 0.3, 0.9], [0, 1, 0, 1], None, 0.3, "best F1"),
    ([0.1, 0.2, 0.3, 0.4], [0, 0, 0, 0], None, 0.4, "1 % false rejects"),  # no anomalies: 1 % of 4 rounds to 0
    ([float(i) for i in range(100)] + [50.0], [0] * 100 + [1], 0.05, 94.0, "5 % false rejects"),
    ([float(i) for i in range(10)], [0] * 10, 0.0, 9.0, "0 % false rejects"),
])
def test_threshold_rules(scores, anomalous, max_false_reject, want, rule):
    threshold, said = choose_threshold(np.array(scores), np.array(anomalous, dtype=bool), max_false_reject)
    assert threshold == pytest.approx(want) and rule in said
    good = np.array(scores)[~np.array(anomalous, dtype=bool)]
    if max_false_reject is not None:
        assert (good > threshold).mean() <= max_false_reject


def test_threshold_needs_good_validation_images():
    with pytest.raises(PetahError, match="no good image"):
        choose_threshold(np.array([1.0, 2.0]), np.array([True, True]), None)


def test_coreset_covers_the_set_better_than_a_random_pick():
    gen = torch.Generator().manual_seed(0)
    points = torch.cat([torch.randn(500, 8, generator=gen), torch.randn(5, 8, generator=gen) + 12])  # 5 outliers
    chosen = coreset_indices(points, 20)
    assert len(set(chosen.tolist())) == 20 and (chosen >= 500).any()  # the rare far points are kept
    radius = lambda idx: float(torch.cdist(points, points[idx]).min(1).values.max())  # noqa: E731
    assert radius(chosen) < radius(torch.randperm(505, generator=gen)[:20])


def test_a_budget_caps_the_bank_and_too_small_a_budget_is_one_line(backbone, surfaces):
    assert bank_rows(None, 32, 1000, 0.1) == 100 and bank_rows(64 * 10, 32, 1000, 0.1) == 10
    train, val = surfaces
    small = api.adapt(backbone, train, val, task_name="s", plan=PlanConfig(budget="0.5%"))
    assert len(encode_package(small.package)) <= 0.005 * backbone.weights_bytes
    with pytest.raises(PetahError, match="budget"):
        api.adapt(backbone, train, val, task_name="s", plan=PlanConfig(budget="2KB"))


def test_package_round_trip_maps_and_png(backbone, surfaces, fitted):
    result, path = fitted
    _train, val = surfaces
    package = read_package(path)  # content hash verified
    assert package.manifest.content_sha256 == result.package.manifest.content_sha256
    runtime = Runtime(backbone)
    runtime.load(path)
    big = torch.nn.functional.interpolate(val.images[-1][None].float(), size=(80, 96)).to(torch.uint8)[0]
    (row,) = runtime.run([big])["surface"]
    assert row["anomaly_map"].shape == (80, 96)
    assert row["threshold"] == pytest.approx(package.manifest.head["threshold"], abs=1e-6)
    assert row["anomalous"] == (row["score"] > row["threshold"]) and row["label"] in ("good", "anomaly")
    assert row["score"] == pytest.approx(float(row["anomaly_map"].max()), rel=1e-5)
    picture = Image.open(io.BytesIO(anomaly_map_png(row["anomaly_map"], row["threshold"])))
    assert picture.mode == "L" and picture.size == (96, 80)
    at_threshold = np.array(Image.open(io.BytesIO(anomaly_map_png(torch.full((2, 2), row["threshold"]),
                                                                  row["threshold"]))))
    assert (at_threshold == 128).all()
    tampered = bytearray(path.read_bytes())
    tampered[-3] ^= 0xFF  # a byte of the bank
    (path.parent / "tampered.petah").write_bytes(bytes(tampered))
    with pytest.raises(PetahError, match="content hash"):
        read_package(path.parent / "tampered.petah")


def test_onnx_export_matches_the_torch_model(backbone, fitted, tmp_path):
    from petah.export.onnx import export_merged

    _result, path = fitted
    report = export_merged(backbone, path, tmp_path / "surface.onnx")
    assert report.max_abs_error <= 1e-4


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def mvtec_folder(root, size=32, good=6):
    rng = np.random.default_rng(0)
    for part, count in (("train/good", good), ("test/good", 3)):
        for i in range(count):
            write_png(root / part / f"{i:03d}.png", rng.integers(90, 110, (size, size), dtype=np.uint8))
    for i in range(3):
        image = rng.integers(90, 110, (size, size), dtype=np.uint8)
        image[8:14, 8:14] = 250
        write_png(root / "test" / "spot" / f"{i:03d}.png", image)
        mask = np.zeros((size, size), np.uint8)
        mask[8:14, 8:14] = 255
        write_png(root / "ground_truth" / "spot" / f"{i:03d}_mask.png", mask)
    return root


def test_mvtec_and_plain_layouts_are_read(tmp_path):
    train, val = load_dataset(str(mvtec_folder(tmp_path / "mvtec")))  # MVTec AD's layout is recognised
    assert len(train) == 6 and not train.labels.any()
    assert val.labels.tolist() == [0, 0, 0, 1, 1, 1] and val.defects[-1] == "spot"
    assert int(val.masks[-1].sum()) == 36 and int(val.masks[0].sum()) == 0
    plain = tmp_path / "plain"
    for i in range(4):
        write_png(plain / "train" / f"{i}.png", np.full((16, 16), 100, np.uint8))
    write_png(plain / "val" / "good" / "g.png", np.full((16, 16), 100, np.uint8))
    write_png(plain / "val" / "dent" / "d.png", np.full((16, 16), 10, np.uint8))
    train, val = load_dataset(str(plain), task="anomaly")
    assert len(train) == 4 and val.labels.tolist() == [1, 0] and val.masks[0] is None  # no mask known


@pytest.mark.parametrize("damage, needle", [
    (lambda r: (r / "train" / "scratch").mkdir(), "train/ holds good images only"),
    (lambda r: [p.unlink() for p in (r / "train" / "good").iterdir()], "no good images"),
    (lambda r: [p.unlink() for p in (r / "test" / "good").iterdir()] and (r / "test" / "good").rmdir(),
     "needs a good/ folder"),
    (lambda r: write_png(r / "ground_truth" / "spot" / "999_mask.png", np.zeros((32, 32), np.uint8)),
     "a mask without an image"),
    (lambda r: write_png(r / "ground_truth" / "spot" / "000_mask.png", np.zeros((16, 16), np.uint8)),
     "mask is (16, 16) px but its image is (32, 32) px"),
])
def test_layout_errors_are_one_line(tmp_path, damage, needle):
    root = mvtec_folder(tmp_path / "data")
    damage(root)
    with pytest.raises(PetahError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        load_dataset(str(root), task="anomaly")


def test_cli_adapt_predict_and_refusals(tmp_path):
    data = mvtec_folder(tmp_path / "data", size=48, good=12)
    bb = str(demo_backbone_path())
    made = one_json(petah_process("adapt", data, "-b", bb, "--task", "anomaly", "--max-false-reject", "0",
                                  "-o", tmp_path / "parts.petah", "--json"))
    assert made["kind"] == "anomaly" and made["plan"] == "patchcore" and made["metrics"]["false_reject_rate"] == 0
    assert made["metrics"]["image_auroc"] == 1.0  # a bright square on flat noise
    run = one_json(petah_process("predict", data / "test" / "spot" / "000.png", data / "test" / "good" / "000.png",
                                 "-b", bb, "-p", tmp_path / "parts.petah", "--out-dir", tmp_path / "out", "--json"))
    spot, good = run["tasks"]["parts"]
    assert spot["anomalous"] and not good["anomalous"]
    assert Image.open(spot["anomaly_map"]).size == (48, 48) and Image.open(spot["overlay"]).mode == "RGB"
    refused = petah_process("adapt", data, "-b", bb, "--task", "anomaly", "--rank", "4", "-o", tmp_path / "x.petah",
                            ok=False)
    assert refused.returncode != 0 and "anomaly tasks adapt no layer" in refused.stderr
    assert not (tmp_path / "x.petah").exists()


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_the_station_answers_with_score_decision_and_map_png(backbone, surfaces, fitted, tmp_path, engine):
    import base64

    from petah.serve import ServeConfig, Station, Upload

    _result, path = fitted
    _train, val = surfaces
    station = Station(backbone, tmp_path / "state", ServeConfig(engine=engine, threads=1), packages=[path])
    buffer = io.BytesIO()
    Image.fromarray(val.images[-1].permute(1, 2, 0).numpy()).save(buffer, format="PNG")
    uploads = [Upload("part.png", buffer.getvalue())]
    station.start()
    try:  # the request path: decode, queue, batch, render as /v1/predict answers
        prediction = station.submit(station.decode(uploads, station.check_tasks(["surface"]))).result(60)
        (image,) = Station.render(prediction, uploads)
    finally:
        station.stop()
    row = image["tasks"]["surface"]
    assert row["kind"] == "anomaly" and row["anomalous"] == (row["score"] > row["threshold"])
    picture = Image.open(io.BytesIO(base64.b64decode(row["anomaly_map_png"])))
    assert picture.mode == "L" and list(picture.size) == row["map_size"] == [64, 64]


def test_the_golden_set_gate_scores_an_anomaly_task(backbone, surfaces, fitted, tmp_path):
    from petah.fleet.gate import score_versions

    _result, path = fitted
    _train, val = surfaces
    golden = tmp_path / "golden" / "surface"
    for i, (image, defect) in enumerate(zip(val.images, val.defects, strict=True)):
        write_png(golden / ("good" if defect == "good" else "defect") / f"{i}.png", image.permute(1, 2, 0).numpy())
    (score,) = score_versions(backbone, {"current": path}, tmp_path / "golden").values()
    assert score.metric == "image_auroc" and 50 < score.value <= 100 and score.seconds > 0
    for image in (golden / "defect").iterdir():  # good parts only: the share answered "good" at the threshold
        image.unlink()
    (score,) = score_versions(backbone, {"current": path}, tmp_path / "golden").values()
    assert score.metric == "accuracy" and 0 <= score.value <= 100
