import copy
import dataclasses

import pytest
import torch
from safetensors.torch import save

from petah import api
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.errors import PetahError
from petah.packages import read_package
from petah.plans import PlanConfig
from petah.runtime.attach import torch_section
from petah.train import TrainConfig


@pytest.fixture
def backbone():
    torch.manual_seed(0)
    return create_backbone("efficientformerv2_s0", 32)


@pytest.fixture
def package_path(backbone, image_folder, tmp_path):
    train, val = load_dataset(str(image_folder), val_split=0.25)
    result = api.adapt(backbone, train, val, plan=PlanConfig(task_norm="affine"), config=TrainConfig(max_steps=2,
                       batch_size=8), task_name="shapes")
    return api.save_package(result, tmp_path / "shapes.petah")


def test_round_trip_reproduces_the_trained_model(backbone, image_folder, tmp_path):
    train, val = load_dataset(str(image_folder), val_split=0.25)
    result = api.adapt(backbone, train, val, plan=PlanConfig(), config=TrainConfig(max_steps=3, batch_size=8),
                       task_name="shapes", adapter_dtype="float32")
    path = api.save_package(result, tmp_path / "p.petah")
    package = read_package(path)
    assert package.manifest.backbone.fingerprint == backbone.fingerprint
    assert package.manifest.labels == train.classes
    # its reference profile (drift and label-free estimates on stations): the training images' own numbers
    from petah.packages.reference import INPUT_STATISTICS, Reference

    reference = Reference(package.manifest.extra["reference"])
    assert reference.images == len(train) and len(reference.input_mean) == len(INPUT_STATISTICS)
    assert reference.metric == "accuracy" and reference.metric_value == result.metrics["accuracy"]
    assert 0 < len(reference.feature_index) <= backbone.num_features and reference.estimator == "atc"
    assert abs(reference.histogram.sum() - 1) < 1e-3
    assert all(k.split("/")[0] in ("adapter", "override", "head") for k in package.tensors)
    assert api.evaluate(backbone, path, val)["accuracy"] == result.metrics["accuracy"]
    # the package changes the features: adapters are really applied on load
    task = api.load_task(backbone, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(task.model.backbone(x), backbone.model(x))


def test_adapt_leaves_the_shared_backbone_untouched(backbone, image_folder):
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    train, val = load_dataset(str(image_folder), val_split=0.25)
    api.adapt(backbone, train, val, plan=PlanConfig(task_norm="stats"), config=TrainConfig(max_steps=2, batch_size=8))
    after = backbone.model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_batchnorm_statistics_do_not_drift(backbone, image_folder):
    train, val = load_dataset(str(image_folder), val_split=0.25)
    result = api.adapt(backbone, train, val, plan=PlanConfig(task_norm="none"), config=TrainConfig(max_steps=3,
                       batch_size=8))
    assert not result.package.section("override")  # nothing of the norms is task-owned
    # and a task with its own statistics stores them
    result = api.adapt(backbone, train, val, plan=PlanConfig(task_norm="stats"), config=TrainConfig(max_steps=3,
                       batch_size=8))
    stats = {k: v for k, v in torch_section(result.package, "override").items() if k.endswith("running_mean")}
    assert stats and any(not torch.equal(v, backbone.model.state_dict()[k]) for k, v in stats.items())


def test_fingerprint_mismatch_names_both(package_path):
    other = create_backbone("efficientformerv2_s0", 64)
    with pytest.raises(PetahError, match=r"trained on efficientformerv2_s0@32px .* but the backbone is "
                                         r"efficientformerv2_s0@64px"):
        api.load_task(other, package_path)


def test_corrupt_byte_is_detected(package_path):
    data = bytearray(package_path.read_bytes())
    data[-10] ^= 0xFF
    package_path.write_bytes(bytes(data))
    with pytest.raises(PetahError, match="was modified or is corrupt"):
        read_package(package_path)


def test_truncated_file_is_detected(package_path):
    data = package_path.read_bytes()
    package_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PetahError, match="truncated or corrupt"):
        read_package(package_path)


def test_not_a_package(tmp_path):
    path = tmp_path / "plain.safetensors"
    path.write_bytes(save({"x": torch.zeros(2)}))
    with pytest.raises(PetahError, match="not a petah task package"):
        read_package(path)
    with pytest.raises(PetahError, match="not found"):
        read_package(tmp_path / "absent.petah")


def test_write_is_atomic(package_path, monkeypatch):
    import os

    original = package_path.read_bytes()
    package = read_package(package_path)

    def failing_replace(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        api.save_package(package, package_path)
    assert package_path.read_bytes() == original
    assert [p.name for p in package_path.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_fp16_adapters_keep_accuracy_and_halve_bytes(backbone, image_folder, tmp_path):
    train, val = load_dataset(str(image_folder), val_split=0.25)
    sizes, accs = {}, {}
    for dtype in ("float32", "float16"):
        torch.manual_seed(0)
        result = api.adapt(backbone, train, val, plan=PlanConfig(), config=TrainConfig(max_steps=3, batch_size=8),
                           adapter_dtype=dtype)
        sizes[dtype] = api.save_package(result, tmp_path / f"{dtype}.petah").stat().st_size
        accs[dtype] = result.metrics["accuracy"]
    assert sizes["float16"] < 0.6 * sizes["float32"]
    assert abs(accs["float16"] - accs["float32"]) <= 1 / 9 + 1e-9  # at most one of 9 val images flips


def test_owned_norm_statistics_are_stored_in_fp16_with_fp16_adapters(backbone):
    from petah.adapters import TaskAdapter
    from petah.runtime import Runtime
    from petah.runtime.attach import build_package
    from petah.tasks import Classification

    work = dataclasses.replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, PlanConfig(rank=2, task_norm="stats"))
    with torch.no_grad():
        for key, tensor in adapter._override_tensors().items():
            if key.endswith("running_var"):
                tensor.mul_(1.5)  # the task's own statistics differ from the backbone's
    head = Classification.build_head(backbone.num_features, 3)
    stored = {}
    for dtype in ("float16", "float32"):
        package = build_package(backbone, adapter, head, task_name="t", labels=["a", "b", "c"], adapter_dtype=dtype)
        overrides = torch_section(package, "override")
        stats = {k: v for k, v in overrides.items() if k.endswith(("running_mean", "running_var"))}
        assert stats and {v.dtype for v in stats.values()} == {getattr(torch, dtype)}
        assert {v.dtype for k, v in overrides.items() if k.endswith("num_batches_tracked")} <= {torch.int64}
        assert {v.dtype for k, v in overrides.items() if k.endswith((".weight", ".bias"))} == {torch.float32}
        stored[dtype] = package
    x = torch.randn(2, 3, 32, 32)
    outputs = {}
    for dtype, package in stored.items():
        runtime = Runtime(backbone)
        runtime.load(package)
        outputs[dtype] = runtime.forward(x, "t")
    assert torch.allclose(outputs["float16"], outputs["float32"], atol=1e-2)  # fp16 rounding of the statistics
