"""Segmentation end to end on tiny data: folders with bad samples, adapt, eval, runtime, export, CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_adapters
from petah import api
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.data.builtin import DEFECT_CLASSES, defects
from petah.errors import PetahError
from petah.export import export_base_and_adapters, export_merged
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.train import TrainConfig

SIZE = 32


def _write_mask_folder(root, count=12, seed=0):
    """images/ + masks/ + classes.txt: a bright square (class 1) on noise, sizes varying."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("background\nsquare\n")
    for i in range(count):
        h, w = 24 + 4 * (i % 3), 28
        image = rng.integers(0, 80, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[4:14, 6:16] = 1
        mask[0, 0] = 255  # an ignored pixel
        image[mask == 1] = 220
        Image.fromarray(image).save(root / "images" / f"s{i}.png")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"s{i}.png")
    return root


@pytest.fixture(scope="module")
def seg(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", SIZE)
    train, val = defects(count=40)
    result = api.adapt(backbone, train, val, plan=PlanConfig(rank=4), config=TrainConfig(max_steps=2, batch_size=8),
                       task_name="defects",
                       adapter_dtype="float32", dice=True)
    perturb_adapters(result.package)
    path = api.save_package(result, root / "defects.petah")
    return {"backbone": backbone, "package": path, "val": val, "root": root, "metrics": result.metrics}


def test_builtin_defects_are_deterministic_and_labelled():
    (a, _), (b, _) = defects(count=20), defects(count=20)
    assert all(torch.equal(x, y) for x, y in zip(a.masks, b.masks, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    values = torch.cat([m.flatten() for m in a.masks]).unique().tolist()
    assert set(values) == set(range(len(DEFECT_CLASSES)))
    assert a.images[0].shape == (3, 64, 64) and a.masks[0].dtype == torch.uint8


def test_bad_samples_are_skipped_and_counted_or_fail_with_strict(tmp_path):
    root = _write_mask_folder(tmp_path / "data")
    (root / "masks" / "s0.png").unlink()  # missing mask
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(root / "masks" / "s1.png")  # size differs
    Image.fromarray(np.full((32, 28), 7, dtype=np.uint8)).save(root / "masks" / "s2.png")  # value outside the classes
    Image.fromarray(np.zeros((24, 28, 3), dtype=np.uint8)).save(root / "masks" / "s3.png")  # RGB, not class indices
    (root / "images" / "s4.png").write_bytes(b"not a png")  # unreadable image
    train, val = load_dataset(str(root), val_split=0.25)
    assert len(train) + len(val) == 7 and len(train.skipped) == 5
    joined = "\n".join(train.skipped)
    for fragment in ("no mask", "s1.png: mask is (5, 5) px but its image is (28, 28) px", "s2.png: mask value 7",
                     "s3.png: a mask must be a single-channel", "s4.png"):
        assert fragment in joined
    with pytest.raises(PetahError, match="s0.png: no mask"):
        load_dataset(str(root), val_split=0.25, strict=True)


def test_adapted_task_outputs_masks_and_metrics(seg):
    metrics = seg["metrics"]
    assert set(metrics["per_class_iou"]) == set(DEFECT_CLASSES) and 0.0 <= metrics["mIoU"] <= 1.0
    task = api.load_task(seg["backbone"], seg["package"])
    assert task.manifest.task.kind == "segmentation" and task.manifest.head["strides"] == [4, 8, 16, 32]
    with torch.no_grad():
        logits = task.model(torch.randn(2, 3, SIZE, SIZE))
    assert logits.shape == (2, len(DEFECT_CLASSES), SIZE, SIZE)
    report = api.evaluate(seg["backbone"], seg["package"], seg["val"])
    assert report["samples"] == len(seg["val"]) and report["pixels"] == len(seg["val"]) * SIZE * SIZE
    with pytest.raises(PetahError, match="is a segmentation task"):
        api.evaluate(seg["backbone"], seg["package"], load_dataset("builtin:digits")[1])


def test_runtime_serves_classification_and_segmentation_together(seg, tmp_path):
    backbone = seg["backbone"]
    train, val = load_dataset("builtin:digits")
    digits = api.adapt(backbone, train.subset(range(40)), val.subset(range(20)), plan=PlanConfig(rank=4),
                       config=TrainConfig(max_steps=1, batch_size=8), task_name="digits")
    runtime = Runtime(backbone)
    runtime.load(seg["package"])
    runtime.load(digits.package)
    image = seg["val"].images[0][:, :50, :40]  # any size: the mask comes back at it
    out = runtime.run([image])
    assert out["digits"][0]["label"] in train.classes
    assert tuple(out["defects"][0]["mask"].shape) == (50, 40)
    assert abs(sum(out["defects"][0]["pixels"].values()) - 1.0) < 1e-4
    assert runtime.shared_stages(["defects", "digits"]) == 0  # dense heads read several stages
    with torch.no_grad():
        alone = api.load_task(backbone, seg["package"]).model(runtime.preprocess.batch([image]))
        assert torch.allclose(runtime.forward(runtime.preprocess.batch([image]), "defects"), alone, atol=1e-5)


def test_merged_onnx_matches_and_base_graph_refuses(seg, tmp_path):
    result = export_merged(seg["backbone"], seg["package"], tmp_path / "defects.onnx")
    assert result.max_abs_error < 1e-4
    with pytest.raises(PetahError, match="segmentation task; the shared base graph holds classification heads"):
        export_base_and_adapters(seg["backbone"], [seg["package"]], tmp_path / "ort")


def test_cli_adapt_eval_predict_on_a_mask_folder(tmp_path):
    from petah.backbones import save_backbone
    from test_cli import one_json, petah

    data = _write_mask_folder(tmp_path / "squares")
    bb = save_backbone(create_backbone("efficientformerv2_s0", SIZE), tmp_path / "bb.safetensors")
    adapted = one_json(petah("adapt", data, "-b", bb, "--task", "segmentation",
                             "--val-split", "0.25", "--max-steps", "2", "--batch-size", "4",
                             "-o", tmp_path / "sq.petah", "--json"))
    assert adapted["kind"] == "segmentation" and "mIoU" in adapted and adapted["skipped_samples"] == 0
    report = one_json(petah("eval", tmp_path / "sq.petah", data, "-b", bb, "--val-split", "0.25", "--json"))
    assert set(report["metrics"]["per_class_iou"]) == {"background", "square"} and "mIoU" in report["metrics"]
    assert "mIoU" in petah("eval", tmp_path / "sq.petah", data, "-b", bb, "--val-split", "0.25").stdout
    lines = petah("predict", data / "images", "-b", bb, "-p", tmp_path / "sq.petah",
                  "--jsonl", "--out-dir", tmp_path / "out").stdout.splitlines()
    first = json.loads(lines[0])["tasks"]["sq"]
    mask = np.array(Image.open(first["mask"]))
    assert mask.shape == (24, 28) and Image.open(first["mask"]).mode == "P"
    assert Image.open(first["overlay"]).size == (28, 24)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    failed = petah("predict", data / "images" / "s0.png", bad, "-b", bb, "-p", tmp_path / "sq.petah",
                   "--out-dir", tmp_path / "none", ok=False)
    assert failed.returncode == 2 and "bad.png" in failed.stderr and not (tmp_path / "none").exists()
    Image.fromarray(np.zeros((5, 5), dtype=np.uint8)).save(data / "masks" / "s1.png")
    warned = petah("eval", tmp_path / "sq.petah", data, "-b", bb, "--val-split", "0.25", "--json")
    assert "skipped 1 bad sample" in warned.stderr and "s1.png" in warned.stderr
    wrong = petah("adapt", "builtin:digits", "-b", bb, "--task", "segmentation",
                  "-o", tmp_path / "x.petah", ok=False)
    assert wrong.returncode == 2 and "labelled for classification" in wrong.stderr



def test_classes_absent_from_a_split_leave_the_mean_and_folder_detection_needs_a_class_list(tmp_path):
    from petah.tasks import Segmentation
    from petah.tasks.segmentation import SegmentationModel

    class Perfect(SegmentationModel):  # predicts the target itself: IoU 1 for the classes present
        def forward(self, x):
            return self.logits

    backbone = create_backbone("efficientformerv2_s0", SIZE)
    target = torch.zeros(2, SIZE, SIZE, dtype=torch.long)
    target[:, :8] = 1
    model = Perfect(backbone.model, Segmentation.head_for(backbone, 4))
    model.logits = torch.nn.functional.one_hot(target, 4).permute(0, 3, 1, 2).float()
    report = Segmentation.evaluate(model, [(torch.zeros(2, 3, SIZE, SIZE), target)], ["a", "b", "c", "d"])
    assert report["mIoU"] == 1.0 and report["per_class_iou"]["c"] is None

    (tmp_path / "cls" / "masks").mkdir(parents=True)  # a classification set with a class called "masks"
    (tmp_path / "cls" / "images").mkdir()
    from petah.data.segmentation import is_mask_folder
    assert not is_mask_folder(tmp_path / "cls") and is_mask_folder(_write_mask_folder(tmp_path / "seg", count=2))
