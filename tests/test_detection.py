"""Detection end to end on tiny data: COCO with bad annotations, adapt, eval, runtime with all
three task kinds, export, CLI."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturb_adapters
from petah import api
from petah.backbones import create_backbone, save_backbone
from petah.data import load_dataset
from petah.data.builtin import defects, digit_boxes
from petah.data.detection import load_coco
from petah.errors import PetahError
from petah.export import export_merged
from petah.packages import read_manifest
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.train import TrainConfig

SIZE = 64  # the smallest input detection takes (stride-32 level 2x2)


def _write_coco(root, count=10, seed=0):
    """A COCO folder: bright squares ("box") and bright bars ("bar") on noise, images 40 x 36 px."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(count):
        canvas = rng.integers(0, 60, (36, 40), dtype=np.uint8)
        canvas[4:16, 4:16] = 230
        canvas[20:24, 10:34] = 200
        Image.fromarray(canvas).save(root / "images" / f"im{i}.png")
        images.append({"id": i + 1, "file_name": f"im{i}.png", "width": 40, "height": 36})
        annotations += [{"id": 2 * i + 1, "image_id": i + 1, "category_id": 3, "bbox": [4, 4, 12, 12]},
                        {"id": 2 * i + 2, "image_id": i + 1, "category_id": 7, "bbox": [10, 20, 24, 4]}]
    coco = {"images": images, "annotations": annotations,
            "categories": [{"id": 7, "name": "bar"}, {"id": 3, "name": "box"}]}
    (root / "annotations.json").write_text(json.dumps(coco))
    return root


@pytest.fixture(scope="module")
def det(tmp_path_factory):
    root = tmp_path_factory.mktemp("det")
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", SIZE)
    train, val = digit_boxes(count=40)
    result = api.adapt(backbone, train, val, plan=PlanConfig(rank=4), config=TrainConfig(max_steps=2, batch_size=8),
                       task_name="digits",
                       adapter_dtype="float32")
    assert result.package.manifest.training["lora_plus"] == 1.0  # detection's default: plain LoRA (measured)
    perturb_adapters(result.package)
    return {"backbone": backbone, "package": api.save_package(result, root / "digits.petah"),
            "val": val, "metrics": result.metrics}


def test_builtin_digit_boxes_are_deterministic_and_inside_the_canvas():
    (a, _), (b, _) = digit_boxes(count=20), digit_boxes(count=20)
    assert all(torch.equal(x, y) for x, y in zip(a.boxes, b.boxes, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))
    boxes = torch.cat(a.boxes)
    assert len(boxes) >= 20 and boxes.min() >= 0 and boxes.max() <= 64 and (boxes[:, 2:] > boxes[:, :2]).all()
    assert torch.cat(a.labels).max() <= 9


def test_coco_categories_map_in_id_order(tmp_path):
    data = load_coco(_write_coco(tmp_path / "c") / "annotations.json")
    assert data.classes == ["box", "bar"] and len(data) == 10  # ids 3, 7 -> indices 0, 1
    assert data.labels[0].tolist() == [0, 1] and data.boxes[0][1].tolist() == [10, 20, 34, 24]


def test_bad_annotations_are_skipped_and_counted_or_fail_with_strict(tmp_path):
    root = _write_coco(tmp_path / "c")
    coco = json.loads((root / "annotations.json").read_text())
    coco["annotations"][0]["bbox"] = [30, 30, 20, 20]  # outside the 40x36 image
    coco["annotations"][2]["category_id"] = 99  # unknown category
    coco["annotations"].append({"id": 99, "image_id": 1234, "category_id": 3, "bbox": [0, 0, 4, 4]})  # unknown image
    (root / "images" / "im3.png").unlink()  # missing file
    (root / "annotations.json").write_text(json.dumps(coco))
    train, val = load_dataset(str(root), val_split=0.25)
    assert len(train) + len(val) == 7 and len(train.skipped) == 4
    joined = "\n".join(train.skipped)
    for fragment in ("im0.png: box [30, 30, 20, 20] lies outside the 40x36 image", "im1.png: unknown category id 99",
                     "unknown image id 1234", "im3.png is missing"):
        assert fragment in joined
    with pytest.raises(PetahError, match="lies outside"):
        load_dataset(str(root), val_split=0.25, strict=True)
    (root / "annotations.json").write_text("{not json")
    with pytest.raises(PetahError, match="annotations.json: not a readable COCO JSON"):
        load_dataset(str(root), val_split=0.25)
    (root / "annotations.json").write_text(json.dumps({"images": []}))
    with pytest.raises(PetahError, match="missing: annotations, categories"):
        load_dataset(str(root), val_split=0.25)


def test_adapted_detector_outputs_boxes_and_map(det):
    metrics = det["metrics"]
    assert {"mAP", "mAP50", "mAP75", "per_class_ap"} <= set(metrics)
    present = {det["val"].classes[int(label)] for labels in det["val"].labels for label in labels}
    assert present <= set(metrics["per_class_ap"]) <= set(det["val"].classes)  # every class the val images hold
    assert metrics["mAP50"] >= metrics["mAP75"] and metrics["mAP50"] >= metrics["mAP"]  # looser IoU, higher AP
    task = api.load_task(det["backbone"], det["package"])
    head = task.manifest.head
    assert task.manifest.task.kind == "detection" and head["type"] == "fcos" and head["strides"] == [8, 16, 32]
    with torch.no_grad():
        outputs = task.model(torch.randn(2, 3, SIZE, SIZE))
    assert outputs.shape == (2, 64 + 16 + 4, 10 + 5)  # 8x8 + 4x4 + 2x2 locations at 64 px
    assert sum(p.numel() for p in task.model.head.parameters()) < 100_000  # every package carries its head


def test_one_runtime_serves_classification_segmentation_and_detection(det, tmp_path):
    backbone = det["backbone"]
    digits_train, digits_val = load_dataset("builtin:digits")
    seg_train, seg_val = defects(count=16)
    config = TrainConfig(max_steps=1, batch_size=8)
    classify = api.adapt(backbone, digits_train.subset(range(32)), digits_val.subset(range(16)),
                         plan=PlanConfig(rank=4), config=config, task_name="class")
    segment = api.adapt(backbone, seg_train, seg_val, plan=PlanConfig(rank=4), config=config, task_name="defects")
    runtime = Runtime(backbone)
    for package in (classify.package, segment.package, det["package"]):
        runtime.load(package)
    image = det["val"].images[0][:, :48, :40]  # boxes and masks come back at the image's own size
    out = runtime.run([image])
    assert out["class"][0]["label"] in digits_train.classes
    assert tuple(out["defects"][0]["mask"].shape) == (48, 40)
    for found in out["digits"][0]["boxes"]:
        x0, y0, x1, y1 = found["box"]
        assert 0 <= x0 <= x1 <= 40 and 0 <= y0 <= y1 <= 48 and found["label"] in [str(i) for i in range(10)]
    with torch.no_grad():
        batch = runtime.preprocess.batch([image])
        loaded = api.load_task(backbone, det["package"]).model
        assert torch.allclose(runtime.forward(batch, "digits"), loaded(batch), atol=1e-5)


def test_too_small_an_input_is_refused():
    from petah.tasks import Detection

    with pytest.raises(PetahError, match="at least 64 px"):
        Detection.head_for(create_backbone("efficientformerv2_s0", 32), 3)


def test_merged_onnx_matches_pytorch(det, tmp_path):
    import onnx

    result = export_merged(det["backbone"], det["package"], tmp_path / "digits.onnx")
    assert result.max_abs_error < 1e-4
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(result.path)).metadata_props if p.key == "petah.head"}
    assert meta["petah.head"]["strides"] == [8, 16, 32] and "centerness" in meta["petah.head"]["output_layout"]


def test_cli_adapt_eval_predict_on_a_coco_folder(tmp_path):
    from test_cli import one_json, petah

    data = _write_coco(tmp_path / "parts")
    bb = save_backbone(create_backbone("efficientformerv2_s0", SIZE), tmp_path / "bb.safetensors")
    adapted = one_json(petah("adapt", "--data", data / "annotations.json", "-b", bb, "--task", "detection",
                             "--val-split", "0.3", "--max-steps", "2", "--batch-size", "4",
                             "-o", tmp_path / "parts.petah", "--json"))
    assert adapted["kind"] == "detection" and "mAP50" in adapted
    # no --epochs / --head-lr: detection's first-run defaults (at least 300 steps, at most 50 epochs)
    training = read_manifest(tmp_path / "parts.petah").training
    assert (training["epochs"], training["head_lr"], training["steps"]) == (50, 1e-2, 2)
    report = one_json(petah("eval", tmp_path / "parts.petah", data / "annotations.json",
                            "-b", bb, "--val-split", "0.3", "--json"))
    assert {"mAP", "mAP50"} <= set(report["metrics"])
    shown = petah("eval", tmp_path / "parts.petah", "--data", data, "-b", bb, "--val-split", "0.3").stdout
    assert "mAP@.5" in shown and "AP" in shown
    line = json.loads(petah("predict", data / "images" / "im0.png", "-b", bb, "-p", tmp_path / "parts.petah", "--jsonl",
                            "--out-dir", tmp_path / "out").stdout.splitlines()[0])
    assert isinstance(line["tasks"]["parts"]["boxes"], list)
    assert Image.open(line["tasks"]["parts"]["overlay"]).size == (40, 36)



def test_malformed_entries_and_missing_val_are_clear_errors(tmp_path):
    root = _write_coco(tmp_path / "c", count=2)
    coco = json.loads((root / "annotations.json").read_text())
    broken = {**coco, "images": [{"id": 1, "file_name": "im0.png"}]}  # no width / height
    (root / "annotations.json").write_text(json.dumps(broken))
    with pytest.raises(PetahError, match="malformed 'categories' or 'images' entry"):
        load_coco(root / "annotations.json")
    coco["annotations"][0]["bbox"] = ["a", 1, 2, 3]
    (root / "annotations.json").write_text(json.dumps(coco))
    assert "annotation #0 is malformed" in load_coco(root / "annotations.json").skipped[0]
    (tmp_path / "split" / "train").mkdir(parents=True)
    (tmp_path / "split" / "train" / "annotations.json").write_text(json.dumps(coco))
    with pytest.raises(PetahError, match="val/ has none"):
        load_dataset(str(tmp_path / "split"), val_split=0.5)


def test_head_uses_the_real_map_sizes_of_backbones_that_round_them():
    from petah.tasks import Detection

    backbone = create_backbone("mobilevitv2_050", 96)  # its stride-32 map is 4x4 at 96 px, not 3x3
    head = Detection.head_for(backbone, 3)
    model = Detection.build_model(backbone.model, head).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 96, 96))
    assert outputs.shape[1] == sum(g * g for g in head.grids)
    decoded = Detection.decode(outputs, ["a", "b", "c"], sizes=[(96, 96)], head=head, img_size=96)
    assert isinstance(decoded[0]["boxes"], list)
