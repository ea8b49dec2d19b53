"""Every family through the same checks: package round trip, ONNX parity, multi-scale features, plan summary."""

import numpy as np
import pytest
import torch

from conftest import FAMILY_MODELS
from petah.adapters import TaskAdapter
from petah.api import load_task, plan_summary
from petah.backbones import create_backbone
from petah.backbones.features import multi_scale_features
from petah.errors import PetahError
from petah.export import export_merged
from petah.packages.format import read_package, write_package
from petah.plans import PlanConfig
from petah.testing import synthetic_package

NO_STRIDE_8 = {"vit_tiny_patch16_224", "efficientvit_m0"}  # plain ViT: stride 16 only; MSRA starts at 16


@pytest.fixture(scope="module", params=FAMILY_MODELS, ids=[name for name, _ in FAMILY_MODELS])
def family_task(request, tmp_path_factory):
    name, size = request.param
    torch.manual_seed(0)
    backbone = create_backbone(name, size)
    path = write_package(tmp_path_factory.mktemp(name) / "task.petah",
                         synthetic_package(backbone, "task", PlanConfig(), classes=4))
    return backbone, path


def test_package_round_trip_reproduces_the_adapted_model(family_task):
    backbone, path = family_task
    package = read_package(path)
    x = torch.randn(2, 3, backbone.img_size, backbone.img_size)
    first, second = load_task(backbone, path), load_task(backbone, package)
    with torch.no_grad():
        out, plain = first.model(x), backbone.model(x)
        assert torch.equal(out, second.model(x))
        assert not torch.allclose(first.model.backbone(x), plain), "the package's adapters must change the features"
    assert first.manifest.plan.to_dict()["targets"] == [
        [t.module, t.method, t.rank] for t in first.adapter.targets]


def test_merged_onnx_matches_pytorch(family_task, tmp_path):
    import onnxruntime as ort

    backbone, path = family_task
    result = export_merged(backbone, path, tmp_path / "task.onnx")
    assert result.max_abs_error < 1e-4
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    x = torch.randn(3, 3, backbone.img_size, backbone.img_size)
    with torch.no_grad():
        expected = load_task(backbone, path).model(x).numpy()
    assert np.abs(session.run(None, {"image": x.numpy()})[0] - expected).max() < 1e-4


def test_multi_scale_features_on_the_adapted_model(family_task):
    backbone, path = family_task
    task = load_task(backbone, path)
    size = backbone.img_size
    x = torch.randn(1, 3, size, size)
    if backbone.name in NO_STRIDE_8:
        with pytest.raises(PetahError, match="no features at stride 8"):
            multi_scale_features(task.model.backbone, x)
        return
    with torch.no_grad():
        adapted = multi_scale_features(task.model.backbone, x)
        plain = multi_scale_features(backbone.model, x)
    assert [tuple(f.shape[-2:]) for f in adapted] == [(size // s, size // s) for s in (8, 16, 32)]
    assert all(a.shape == p.shape for a, p in zip(adapted, plain, strict=True))
    assert not torch.allclose(adapted[-1], plain[-1]), "features come from the adapted model"


def test_plan_summary_counts_what_the_adapter_trains(family_task):
    backbone, _ = family_task
    for preset in ("petah", "bitfit"):
        summary = plan_summary(backbone, plan=PlanConfig(preset=preset), classes=4)
        adapter = TaskAdapter(create_backbone(backbone.name, backbone.img_size), PlanConfig(preset=preset))
        trainable = sum(p.numel() for p in adapter.trainable_parameters())
        assert summary["adapter_parameters"] + summary["owned_parameters"] == trainable > 0
        assert summary["head_parameters"] == 4 * (backbone.num_features + 1)
        assert [layer["module"] for layer in summary["layers"]] == [t.module for t in adapter.targets]
        assert (preset == "bitfit") == (summary["adapter_parameters"] == 0)


def test_generic_plan_errors_name_the_pattern():
    backbone = create_backbone("resnet10t", 32)
    with pytest.raises(PetahError, match=r"'bn1\$' matches bn1 \(BatchNorm2d\), which petah cannot adapt"):
        TaskAdapter(backbone, PlanConfig(targets=["bn1$"]))
    with pytest.raises(PetahError, match="'nothing' matches no layer of resnet10t"):
        TaskAdapter(backbone, PlanConfig(targets=["conv1$", "nothing"]))
    with pytest.raises(PetahError, match="not a valid regular expression"):
        TaskAdapter(backbone, PlanConfig(targets=["(("]))
    adapter = TaskAdapter(backbone, PlanConfig(targets=[r"^layer4\.0\.conv\d$"]))
    assert [t.module for t in adapter.targets] == ["layer4.0.conv1", "layer4.0.conv2"]


def test_the_device_merge_matches_the_torch_runtime(family_task, tmp_path):
    """The device backbone (one graph, nothing folded) with a package merged in numpy answers what
    the torch runtime answers: the same LoRA / channel-scale merge, owned norm statistics and head;
    held on the shared base (adapters as branches beside the unmerged layers) too."""
    import onnxruntime as ort

    from petah.device import read_device_backbone, task_graph
    from petah.device.base import (
        Layout,
        NotOnBase,
        adapter_sites,
        base_adapters,
        base_graph,
        head_graph,
        layout_inputs,
        padded,
    )
    from petah.export.device import export_device

    backbone, path = family_task
    export_device(backbone, tmp_path / "device")
    device = read_device_backbone(tmp_path / "device")
    assert device.fingerprint == backbone.fingerprint
    owned = synthetic_package(backbone, "owned", PlanConfig(task_norm="stats", rank=4), classes=3, seed=1)
    x = torch.randn(3, 3, backbone.img_size, backbone.img_size)
    for package in (read_package(path), owned):
        graph = task_graph(device, package, "the package")
        got = ort.InferenceSession(graph.graph, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            expected = load_task(backbone, package).model(x).numpy()
        assert np.abs(got - expected).max() < 1e-4
        # held on the shared base instead: the unmerged graph with the adapters as branches, then the head
        if package is owned:
            with pytest.raises(NotOnBase, match="owns backbone tensors"):
                base_adapters(device, package, "the package")
            continue
        adapters = base_adapters(device, package, "the package")
        layout = Layout.of([adapters])
        assert len(layout.lora) + len(layout.scaled) == len(package.manifest.plan.targets) > 0
        base = ort.InferenceSession(base_graph(device, layout), providers=["CPUExecutionProvider"])
        head, reads = head_graph(device, package, "the package")
        feed = padded(adapters, layout_inputs(layout, adapter_sites(device)))
        features = base.run(reads, {"image": x.numpy(), **feed})
        got = ort.InferenceSession(head, providers=["CPUExecutionProvider"]).run(
            None, dict(zip(reads, features, strict=True)))[0]
        assert np.abs(got - expected).max() < 1e-4


@pytest.mark.parametrize("name, size", [("efficientformerv2_s0", 64), ("mobilevit_xxs", 64)])
@pytest.mark.parametrize("kind_name", ["segmentation", "detection", "anomaly"])
def test_dense_heads_run_on_the_device_as_in_the_torch_runtime(name, size, kind_name, tmp_path):
    """A dense package carries its head's graph (format 3): the device's answers (raw outputs and
    decoded masks / boxes, decoded in numpy) equal the torch runtime's."""
    import onnxruntime as ort

    from petah.device import decode, read_device_backbone, task_graph
    from petah.export.device import export_device
    from petah.tasks import task_kind

    torch.manual_seed(0)
    backbone = create_backbone(name, size)
    export_device(backbone, tmp_path / "device")
    kind = task_kind(kind_name)
    head = kind.head_for(backbone, 3) if kind_name != "anomaly" else kind.head_for(backbone, 2, size=40)
    labels = ["a", "b", "c"] if kind_name != "anomaly" else ["good", "anomaly"]
    with torch.no_grad():
        for param in head.parameters():
            param.add_(torch.randn(param.shape) * 0.05)
        if kind_name == "anomaly":
            head.bank.copy_(torch.randn(head.bank.shape).half())
            head.threshold = 2.0
    plain = synthetic_package(backbone, "t", PlanConfig(), classes=3)
    from petah.runtime.attach import build_package

    work = load_task(backbone, plain)
    package = build_package(backbone, work.adapter, head, task_name="t", labels=labels, kind=kind,
                            adapter_dtype="float32")
    package = read_package(write_package(tmp_path / "t.petah", package))
    assert package.manifest.format_version == 3 and "graph/head" in package.tensors
    graph = task_graph(read_device_backbone(tmp_path / "device"), package, "the package")
    x = torch.randn(2, 3, size, size)
    got = ort.InferenceSession(graph.graph, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    task = load_task(backbone, package)
    with torch.no_grad():
        expected = task.model(x)
    assert np.abs(got - expected.numpy()).max() < 1e-4
    sizes = [(size, size), (size + 16, size - 8)]
    if kind_name == "detection":
        want = kind.decode(expected, task.classes, sizes=sizes, head=task.model.head, img_size=size)
        assert decode.detection(expected.numpy(), task.classes, package.manifest.head, size, sizes) == want
    elif kind_name == "anomaly":
        want = kind.decode(expected, task.classes, sizes=sizes, head=task.model.head)
        have = decode.anomaly(got, task.classes, package.manifest.head["threshold"], sizes)
        assert [(h["label"], h["anomalous"]) for h in have] == [(w["label"], w["anomalous"]) for w in want]
        assert all(abs(h["score"] - w["score"]) < 1e-4 for h, w in zip(have, want, strict=True))
    else:
        want = kind.decode(expected, task.classes, sizes=sizes)
        have = decode.segmentation(got, task.classes, sizes)
        assert all(np.mean(h["mask"] == w["mask"].numpy()) > 0.995 for h, w in zip(have, want, strict=True))
