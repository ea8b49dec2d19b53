"""The multi-task runtime: one backbone, several packages, switching, merged mode, rollback."""

import numpy as np
import pytest
import torch

from conftest import perturb_adapters, write_pattern_folder
from petah import api
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.errors import PetahError
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.testing import synthetic_package
from petah.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    folder = write_pattern_folder(root / "shapes", 8, seed=7)
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", 32)
    train, val = load_dataset(str(folder), val_split=0.25)
    packages = {}
    for name, plan in [("a", PlanConfig()), ("b", PlanConfig(rank=4, task_norm="stats")),
                       ("c", PlanConfig(preset="bitfit"))]:
        torch.manual_seed(1)
        result = api.adapt(backbone, train, val, plan=plan, config=TrainConfig(max_steps=3, batch_size=8, lr=1e-2),
                           task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        packages[name] = api.save_package(result, root / f"{name}.petah")
    return {"backbone": backbone, "packages": packages, "val": val, "root": root}


def _reference(backbone, package, x):
    task = api.load_task(backbone, package)
    with torch.no_grad():
        return task.model(x)


def test_switching_tasks_matches_each_task_alone(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = api.open_runtime(backbone, packages.values())
    x = torch.randn(3, 3, 32, 32)
    expected = {name: _reference(backbone, path, x) for name, path in packages.items()}
    for name in ["a", "b", "c", "a", "c", "b"]:  # back and forth
        torch.testing.assert_close(runtime.forward(x, name), expected[name], rtol=1e-4, atol=1e-5)
    # the resident backbone is shared, not copied per task
    before = sum(p.numel() for p in backbone.model.parameters())
    assert sum(p.numel() for p in runtime.backbone.model.parameters()) < before * 1.3


def test_merged_mode_equals_unmerged(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = api.open_runtime(backbone, packages.values())
    x = torch.randn(2, 3, 32, 32)
    unmerged = {name: runtime.forward(x, name) for name in packages}
    runtime.set_mode("merged")
    for name in ["b", "a", "c", "a"]:
        out = runtime.forward(x, name)
        assert runtime.tasks[name].adapter.merged or not runtime.tasks[name].adapter.targets
        torch.testing.assert_close(out, unmerged[name], rtol=1e-4, atol=1e-4)
    runtime.set_mode("unmerged")
    torch.testing.assert_close(runtime.forward(x, "a"), unmerged["a"], rtol=1e-5, atol=1e-5)


def test_unload_restores_the_plain_backbone(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = Runtime(backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = runtime.backbone.model(x)
    for path in packages.values():
        runtime.load(path)
    runtime.forward(x, "b")
    for name in list(runtime.tasks):
        runtime.unload(name)
    assert not any(hasattr(m, "lora_A") or hasattr(m, "deltas") for m in runtime.backbone.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(runtime.backbone.model(x), plain, rtol=0, atol=0)


def test_mismatched_package_is_refused_while_others_serve(setup, tmp_path):
    backbone, packages = setup["backbone"], setup["packages"]
    other = create_backbone("efficientformerv2_s0", 64)
    train, val = load_dataset(str(setup["root"] / "shapes"), val_split=0.25)
    foreign = api.save_package(api.adapt(other, train, val, plan=PlanConfig(), config=TrainConfig(max_steps=1,
                               batch_size=8), task_name="foreign"), tmp_path / "f.petah")
    runtime = Runtime(backbone)
    runtime.load(packages["a"])
    x = torch.randn(1, 3, 32, 32)
    before = runtime.forward(x, "a")
    with pytest.raises(PetahError, match="trained on efficientformerv2_s0@64px"):
        runtime.load(foreign)
    assert list(runtime.tasks) == ["a"]
    torch.testing.assert_close(runtime.forward(x, "a"), before, rtol=0, atol=0)


def test_failed_reload_rolls_back_and_good_reload_replaces(setup, tmp_path):
    from petah.packages.format import read_package

    backbone, packages = setup["backbone"], setup["packages"]
    runtime = Runtime(backbone)
    runtime.load(packages["a"])
    x = torch.randn(1, 3, 32, 32)
    before = runtime.forward(x, "a")
    # a newer "a" whose adapter tensors do not fit the layers: the load fails half-way
    broken = read_package(packages["a"])
    key = next(k for k in broken.tensors if k.endswith("lora_A"))
    broken.tensors[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(PetahError):
        runtime.load(broken)
    torch.testing.assert_close(runtime.forward(x, "a"), before, rtol=0, atol=0)
    assert all(len(m.lora_A) == 1 for m in runtime.backbone.model.modules() if hasattr(m, "lora_A"))
    # a good newer version (here: package b under the name a) replaces it
    runtime.load(packages["b"], name="a")
    torch.testing.assert_close(runtime.forward(x, "a"), _reference(backbone, packages["b"], x), rtol=1e-4, atol=1e-5)


def test_run_decodes_every_task(setup):
    runtime = api.open_runtime(setup["backbone"], setup["packages"].values())
    images = setup["val"].images[:4]
    results = runtime.run(images)
    assert set(results) == {"a", "b", "c"} and all(len(v) == 4 for v in results.values())
    with pytest.raises(PetahError, match="no task 'zzz'"):
        runtime.activate("zzz")


def test_shared_trunk_runs_unadapted_stages_once_with_equal_results(setup, tmp_path, monkeypatch):
    backbone = setup["backbone"]
    train, val = load_dataset(str(setup["root"] / "shapes"), val_split=0.25)
    runtime = Runtime(backbone)
    for name, stages in [("late1", {0: 0, 1: 0}), ("late2", {0: 0, 1: 0, 2: 0})]:
        torch.manual_seed(2)
        result = api.adapt(backbone, train, val, plan=PlanConfig(stage_ranks=stages), config=TrainConfig(max_steps=2,
                           batch_size=8), task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        runtime.load(api.save_package(result, tmp_path / f"{name}.petah"))
    runtime.load(setup["packages"]["a"])  # adapts every stage: not loaded for the shared run
    assert runtime.shared_stages(["late1", "late2"]) == 2
    assert runtime.shared_stages(["late1", "a"]) == 0
    x = torch.randn(3, 3, 32, 32)
    runtime.activate("a")  # the trunk must not run with another task's adapters
    calls = {"n": 0}
    stem_forward = runtime.backbone.model.stem.forward
    monkeypatch.setattr(runtime.backbone.model.stem, "forward",
                        lambda t: (calls.__setitem__("n", calls["n"] + 1), stem_forward(t))[1])
    shared = runtime.forward_many(x, ["late1", "late2"])
    assert calls["n"] == 1
    for mode in ("unmerged", "merged"):
        runtime.set_mode(mode)
        for name in ("late1", "late2"):
            torch.testing.assert_close(shared[name], runtime.forward(x, name), rtol=1e-4, atol=1e-4)


def test_staged_install_leaves_the_live_model_alone_until_installed(setup):
    """prepare(stage=True) adds the adapters to a shadow (a server does it beside running batches):
    the live outputs do not move until install, which then equals a cold load; a shadow made stale
    by another change falls back to the cold path."""
    backbone, packages = setup["backbone"], setup["packages"]
    extra = synthetic_package(backbone, "d", PlanConfig(rank=2), classes=3, seed=4)
    x = torch.randn(2, 3, 32, 32)
    runtime, reference = Runtime(backbone), Runtime(backbone)
    for rt in (runtime, reference):
        rt.load(packages["a"])
        rt.load(packages["b"])  # owns norm statistics: never staged
    before = runtime.forward_many(x, ["a", "b"])
    prepared = runtime.prepare(extra, stage=True)
    assert prepared.staged is not None and runtime.prepare(packages["b"], stage=True).staged is None
    during = runtime.forward_many(x, ["a", "b"])
    assert all(torch.equal(before[n], during[n]) for n in before)
    runtime.install(prepared)
    reference.load(extra)
    got, want = runtime.forward_many(x, ["a", "b", "d"]), reference.forward_many(x, ["a", "b", "d"])
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    stale = runtime.prepare(packages["a"], stage=True)
    runtime.unload("d")  # changes the structure after the shadow was taken
    runtime.install(stale)
    reference.unload("d")
    reference.load(packages["a"])
    got, want = runtime.forward_many(x, ["a", "b"]), reference.forward_many(x, ["a", "b"])
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_the_device_gate_scores_what_the_torch_gate_scores(tmp_path):
    """The same golden set, the same package: the device engine's accuracy is the torch runtime's."""
    from PIL import Image

    from conftest import make_pattern
    from petah.backbones import demo_backbone_path
    from petah.fleet.gate import score_versions
    from petah.serve import demo_device_backbone, demo_packages
    from petah.serve.engine import DeviceEngine

    digits = next(p for p in demo_packages() if p.stem == "digits")
    golden = tmp_path / "golden"
    for label in range(10):
        (golden / "digits" / str(label)).mkdir(parents=True)
        for i in range(2):
            pattern = make_pattern(label, size=64, seed=i)
            Image.fromarray(pattern).save(golden / "digits" / str(label) / f"{i}.png")
    device = demo_device_backbone()
    on_device = score_versions(device, {"v": digits}, golden, DeviceEngine(device, threads=1))["v"]
    with_torch = score_versions(create_backbone(weights=str(demo_backbone_path())), {"v": digits}, golden)["v"]
    assert (on_device.metric, on_device.value) == (with_torch.metric, with_torch.value)


def test_tasks_that_leave_the_early_stages_alone_share_one_trunk_on_the_device():
    """Budget plans give early stages rank 0: the device engine runs that part once for all such
    tasks (weights held once) and each task's own part after it; answers as the torch runtime's."""
    from petah.backbones import demo_backbone_path
    from petah.device import decode
    from petah.runtime.attach import load_task
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = create_backbone(weights=str(demo_backbone_path()))
    late = PlanConfig(stage_ranks={0: 0, 1: 0, 2: 0})
    packages = {f"late{i}": synthetic_package(backbone, f"late{i}", late, classes=4, seed=i) for i in range(2)}
    packages["all"] = synthetic_package(backbone, "all", PlanConfig(), classes=4, seed=3)
    engine = DeviceEngine(demo_device_backbone(), threads=1)
    for name, package in packages.items():
        engine.install(engine.prepare(package, name))
    held = {name: engine.held(name) for name in packages}
    assert held["late0"]["form"] == "shared trunk + merged" and held["late0"]["trunk_tasks"] == 2
    assert engine.tasks["late0"].merged.trunk is engine.tasks["late1"].merged.trunk and len(engine.trunks) == 1
    assert held["all"]["form"] == "merged"  # its first stage is adapted: nothing to share
    assert held["late0"]["own_bytes"] + held["late0"]["trunk_bytes"] <= held["all"]["own_bytes"]
    images = [np.random.default_rng(i).integers(0, 256, (3, 64, 64), dtype=np.uint8) for i in range(3)]
    answers = engine.run(images, list(packages), top_k=4)
    x = torch.stack([backbone_input(backbone, image) for image in images])
    for name, package in packages.items():
        with torch.no_grad():
            logits = load_task(backbone, package).model(x).numpy()
        want = decode.classification(logits, [str(i) for i in range(4)], 4)
        got = answers[name]
        assert [row["label"] for row in got] == [row["label"] for row in want]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for g, w in zip(got, want, strict=True)
                   for a, b in zip(g["top"], w["top"], strict=True))
    engine.unload("late0")
    assert len(engine.trunks) == 1
    engine.unload("late1")
    assert not engine.trunks


def backbone_input(backbone, image: np.ndarray) -> torch.Tensor:
    from petah.data import Preprocess

    return Preprocess(backbone.img_size, backbone.mean, backbone.std)(torch.from_numpy(image))


def test_the_device_gate_scores_a_task_that_runs_on_a_shared_trunk(tmp_path):
    from PIL import Image

    from conftest import make_pattern
    from petah.backbones import demo_backbone_path
    from petah.fleet.gate import score_versions
    from petah.packages import write_package
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = create_backbone(weights=str(demo_backbone_path()))
    late = synthetic_package(backbone, "late", PlanConfig(stage_ranks={0: 0, 1: 0, 2: 0}), classes=2)
    path = write_package(tmp_path / "late.petah", late)
    for label in ("0", "1"):
        (tmp_path / "golden" / "late" / label).mkdir(parents=True)
        Image.fromarray(make_pattern(int(label), size=64)).save(tmp_path / "golden" / "late" / label / "a.png")
    device = demo_device_backbone()
    engine = DeviceEngine(device, threads=1)
    assert engine.prepare(path, None).merged.trunk is not None
    on_device = score_versions(device, {"v": path}, tmp_path / "golden", engine)["v"]
    with_torch = score_versions(backbone, {"v": path}, tmp_path / "golden")["v"]
    assert (on_device.metric, on_device.value) == (with_torch.metric, with_torch.value)


# --- the device gate's numbers against the torch gate's, and its numpy metrics against the libraries

GOLDEN_SIDE = 80  # not the demo's 64 px: images, masks and boxes go through the views' resizing


def _save(image: torch.Tensor, path) -> None:
    from PIL import Image

    Image.fromarray(image.permute(1, 2, 0).numpy()).resize((GOLDEN_SIDE, GOLDEN_SIDE), Image.BILINEAR).save(path)


def _defects_golden(folder) -> None:
    from PIL import Image

    from petah.data.builtin import defects

    _, val = defects(count=15, seed=5)
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text("\n".join(val.classes))
    for i, (image, mask) in enumerate(zip(val.images, val.masks, strict=True)):
        _save(image, folder / "images" / f"{i}.png")
        mask = mask.numpy().copy()
        mask[:2, :5] = 255  # ignored pixels
        Image.fromarray(mask).resize((GOLDEN_SIDE, GOLDEN_SIDE), Image.NEAREST).save(folder / "masks" / f"{i}.png")


def _digit_boxes_golden(folder) -> None:
    import json

    from petah.data.builtin import digit_boxes

    _, val = digit_boxes(count=15, seed=5)
    folder.mkdir(parents=True)
    scale = GOLDEN_SIDE / 64
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": c} for i, c in enumerate(val.classes)]}
    for i, (image, boxes, labels) in enumerate(zip(val.images, val.boxes, val.labels, strict=True)):
        _save(image, folder / f"{i}.png")
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": GOLDEN_SIDE, "height": GOLDEN_SIDE})
        for (x0, y0, x1, y1), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": i, "category_id": label,
                                        "bbox": [x0 * scale, y0 * scale, (x1 - x0) * scale, (y1 - y0) * scale]})
    (folder / "annotations.json").write_text(json.dumps(coco))


def _surfaces_golden(folder, defective: int = 3) -> None:
    from petah.data.builtin import surface_anomalies

    _, val = surface_anomalies(train_count=1, val_good=3, val_defective=defective, seed=5)
    for i, (image, defect) in enumerate(zip(val.images, val.defects, strict=True)):
        (folder / defect).mkdir(parents=True, exist_ok=True)
        _save(image, folder / defect / f"{i}.png")


@pytest.fixture(scope="module")
def demo_backbones():
    from petah.backbones import demo_backbone_path
    from petah.serve import demo_device_backbone

    return create_backbone(weights=str(demo_backbone_path())), demo_device_backbone()


@pytest.mark.parametrize("task, write, metric", [
    ("defects", _defects_golden, "mIoU"),
    ("digit-boxes", _digit_boxes_golden, "mAP50"),
    ("surfaces", _surfaces_golden, "image_auroc"),
    ("surfaces", lambda folder: _surfaces_golden(folder, defective=0), "accuracy"),
], ids=["segmentation", "detection", "anomaly", "anomaly, good images only"])
def test_the_device_gate_scores_as_the_torch_gate(tmp_path, demo_backbones, task, write, metric):
    """The same package on the same golden set: the device engine's graph and numpy metrics give the
    number the torch task model and torchmetrics give."""
    from petah.fleet.gate import score_versions
    from petah.serve import demo_packages
    from petah.serve.engine import DeviceEngine

    torch_backbone, device = demo_backbones
    package = {p.stem: p for p in demo_packages()}[task]
    write(tmp_path / task)
    on_device = score_versions(device, {"v": package}, tmp_path, DeviceEngine(device, threads=1))["v"]
    with_torch = score_versions(torch_backbone, {"v": package}, tmp_path)["v"]
    assert on_device.metric == with_torch.metric == metric
    # both rounded as evaluate reports (6 decimals): equal but for a sum's last float32 bit at a rounding edge
    assert on_device.value == pytest.approx(with_torch.value, abs=2e-4)
    assert 0 < with_torch.value <= 100


def _boxes(rng, count: int, like: np.ndarray | None = None) -> np.ndarray:
    corner, side = rng.uniform(0, 50, (count, 2)), rng.uniform(1, 30, (count, 2))
    boxes = np.concatenate([corner, corner + side], 1).astype(np.float32)
    if like is not None and len(like):  # most near a ground truth: matches, duplicates, near misses
        near = rng.random(count) < 0.7
        boxes[near] = like[rng.integers(0, len(like), count)][near] + rng.normal(0, 3, (count, 4))[near]
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 0.5)
    return boxes


def _recall_cases():
    """Five boxes of one class found in the order ``hits`` (1: a match): recalls of exactly k / 5
    meet torchmetrics' float32 recall thresholds (one rounds below 0.2, another above 0.6)."""
    truth = [{"boxes": np.array([[12 * i, 0, 12 * i + 10, 10] for i in range(5)], np.float32),
              "labels": np.zeros(5, int)}]
    for hits in ([1, 0, 1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 0, 0, 1, 1]):
        matches = iter(truth[0]["boxes"])
        boxes = [next(matches) if hit else np.array([0, 40 + k, 10, 50 + k], np.float32) for k, hit in enumerate(hits)]
        yield [{"boxes": np.stack(boxes), "scores": np.linspace(0.9, 0.1, len(hits)).astype(np.float32),
                "labels": np.zeros(len(hits), int)}], truth


def test_numpy_map50_equals_torchmetrics_with_pycocotools():
    from torchmetrics.detection import MeanAveragePrecision

    from petah.device.metrics import map50

    rng = np.random.default_rng(0)
    cases = list(_recall_cases())
    for trial in range(25):
        found, truth = [], []
        for _ in range(int(rng.integers(1, 5))):
            gt = _boxes(rng, int(rng.integers(0, 6)))
            labels = rng.integers(0, 3, len(gt))
            count = int(rng.integers(0, 8))
            scores = rng.choice([0.3, 0.6, 0.9], count) if trial % 3 == 0 else rng.random(count)  # ties, or none
            found.append({"boxes": _boxes(rng, count, gt), "scores": scores.astype(np.float32),
                          "labels": np.where(rng.random(count) < 0.8, labels[rng.integers(0, len(gt), count)]
                                             if len(gt) else 0, rng.integers(0, 3, count))})
            truth.append({"boxes": gt, "labels": labels})
        cases.append((found, truth))
    for found, truth in cases:
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        metric.update([{k: torch.from_numpy(np.asarray(v)) for k, v in f.items()} for f in found],
                      [{k: torch.from_numpy(np.asarray(v)) for k, v in t.items()} for t in truth])
        assert np.float32(map50(found, truth)) == float(metric.compute()["map_50"])


def test_numpy_auroc_and_miou_equal_torchmetrics():
    from torchmetrics.classification import BinaryAUROC, MulticlassJaccardIndex

    from petah.device.metrics import auroc, confusion_matrix, mean_iou
    from petah.tasks.anomaly import auroc as build_side_auroc

    rng = np.random.default_rng(1)
    for scale in (0.1, 0.25, 3.0, 20.0):  # ties throughout; distances far above 1 (torchmetrics would squash them)
        scores = (rng.integers(0, 6, 40) * scale + rng.choice([0, 0.01], 40)).astype(np.float32)
        truth = rng.random(40) < 0.4
        if scale < 1:  # in [0, 1], torchmetrics takes the scores as they are
            want = BinaryAUROC()(torch.from_numpy(scores), torch.from_numpy(truth.astype(np.int64)))
            assert auroc(scores, truth) == pytest.approx(float(want), abs=1e-6)
        assert build_side_auroc(scores, truth) == round(auroc(scores, truth), 6)
    # distances above ~17 are no longer tied by a sigmoid: a perfect separation scores 1
    assert build_side_auroc(np.array([18.0, 19.0, 30.0, 40.0]), np.array([False, False, True, True])) == 1.0
    for classes in (2, 4, 9, 17):  # absent classes, ignored pixels, sums of more than 8 IoUs
        target = rng.integers(0, classes, (3, 24, 24))
        target[rng.random(target.shape) < 0.1] = 255
        predicted = np.where(rng.random(target.shape) < 0.6, target % classes, rng.integers(0, classes, target.shape))
        metric = MulticlassJaccardIndex(classes, average=None, ignore_index=255, zero_division=float("nan"))
        iou = metric(torch.from_numpy(predicted), torch.from_numpy(target))
        assert mean_iou(confusion_matrix(target, predicted, classes)) == pytest.approx(float(iou.nanmean()), abs=1e-6)


def test_the_torch_conventions_the_device_metrics_follow():
    """torch's linspace (the recall thresholds torchmetrics hands pycocotools), its nearest-exact mask resize."""
    import torchvision.transforms.v2.functional as TF

    from petah.device.metrics import recall_thresholds
    from petah.imaging import resize_nearest

    rng = np.random.default_rng(2)
    assert np.array_equal(recall_thresholds(), torch.linspace(0.0, 1.0, 101).double().numpy())
    for height, width, out in [(80, 80, 64), (37, 100, 64), (64, 64, 224), (333, 251, 96)]:
        mask = rng.integers(0, 256, (height, width), dtype=np.uint8)
        want = TF.resize(torch.from_numpy(mask)[None], [out, out], interpolation=TF.InterpolationMode.NEAREST_EXACT)
        assert np.array_equal(resize_nearest(mask, out, out), want[0].numpy())
