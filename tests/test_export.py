"""ONNX export with merged adapters: parity (random + real inputs), dynamic batch, metadata, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import perturb_adapters
from petah import api
from petah.backbones import create_backbone
from petah.data import Preprocess, load_builtin
from petah.errors import PetahError
from petah.export import export_merged
from petah.plans import PlanConfig
from petah.train import TrainConfig


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", 32)
    train, val = load_builtin("digits")
    train, val = train.subset(range(60)), val.subset(range(40))
    packages = {}
    for name, plan in [("lora", PlanConfig(rank=4)), ("norms", PlanConfig(task_norm="stats"))]:
        result = api.adapt(backbone, train, val, plan=plan, config=TrainConfig(max_steps=2, batch_size=16),
                           task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        packages[name] = api.save_package(result, root / f"{name}.petah")
    real = Preprocess(32, backbone.mean, backbone.std).batch(val.images[:8])
    return {"backbone": backbone, "packages": packages, "root": root, "real": real}


@pytest.mark.parametrize("name", ["lora", "norms"])
def test_merged_onnx_matches_pytorch(task, name):
    import onnx
    import onnxruntime as ort

    out = task["root"] / f"{name}.onnx"
    result = export_merged(task["backbone"], task["packages"][name], out, task["real"])
    assert result.max_abs_error < 1e-4 and out.stat().st_size == result.onnx_bytes
    model = onnx.load(str(out))
    assert model.opset_import[0].version >= 17
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["petah.preprocessing"])["img_size"] == 32
    assert json.loads(meta["petah.task"])["labels"] == [str(i) for i in range(10)]
    # independent check: real digits, several batch sizes, against the unmerged task in PyTorch
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    reference = api.load_task(task["backbone"], task["packages"][name]).model
    for batch in (task["real"][:1], task["real"]):
        with torch.no_grad():
            expected = reference(batch).numpy()
        assert np.abs(session.run(None, {"image": batch.numpy()})[0] - expected).max() < 1e-4


def test_export_failure_names_the_layer(task, monkeypatch):
    from petah.export import onnx as onnx_export

    class Unexportable(nn.Module):
        def forward(self, x):
            raise RuntimeError("operator not supported")

    real = onnx_export.merged_task_module

    def broken(backbone, package):
        module, manifest = real(backbone, package)
        module.backbone.stages[2].blocks[0] = Unexportable()
        return module, manifest

    monkeypatch.setattr(onnx_export, "merged_task_module", broken)
    with pytest.raises(PetahError, match=r"layer backbone\.stages\.2\.blocks\.0 \(Unexportable\) failed"):
        export_merged(task["backbone"], task["packages"]["lora"], task["root"] / "x.onnx")
    assert not (task["root"] / "x.onnx").exists()


def test_base_onnx_with_ort_adapters_matches_every_task(task, tmp_path):
    import onnxruntime as ort

    from petah.export import export_base_and_adapters

    with pytest.raises(PetahError, match="owns norm / bias tensors"):
        export_base_and_adapters(task["backbone"], [task["packages"]["lora"], task["packages"]["norms"]], tmp_path)
    # a second task with the same plan shape but other values and fewer classes (padded head)
    train, val = load_builtin("digits")
    keep = [i for i in range(200) if int(train.labels[i]) < 4][:40]
    small = train.subset(keep)
    small.classes = small.classes[:4]
    torch.manual_seed(3)
    other = api.adapt(task["backbone"], small, small, plan=PlanConfig(rank=4), config=TrainConfig(max_steps=2,
                      batch_size=8), task_name="four", adapter_dtype="float32")
    other_path = api.save_package(other, tmp_path / "four.petah")
    result = export_base_and_adapters(task["backbone"], [task["packages"]["lora"], other_path],
                                      tmp_path / "out", task["real"])
    assert [r["task"] for r in result.tasks] == ["lora", "four"]
    assert all(r["max_abs_error"] < 1e-4 for r in result.tasks)
    # a device: one session, the adapter chosen per call
    session = ort.InferenceSession(str(result.base_path), providers=["CPUExecutionProvider"])
    for name, path in [("lora", task["packages"]["lora"]), ("four", other_path)]:
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / "out" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        logits = session.run(None, {"image": task["real"].numpy()}, options)[0]
        expected = api.load_task(task["backbone"], path).model(task["real"]).detach().numpy()
        classes = expected.shape[1]
        assert np.abs(logits[:, :classes] - expected).max() < 1e-4
        assert (logits[:, classes:] < -1e8).all()  # padded classes never win
        labels = json.loads((tmp_path / "out" / f"{name}.json").read_text())["labels"]
        assert len(labels) == classes
