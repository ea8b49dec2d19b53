"""ONNX export with merged adapters: parity (random + real inputs), dynamic batch, metadata, errors."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

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
        result = api.adapt(backbone, train, val, plan, TrainConfig(max_steps=2, batch_size=16), name, adapter_dtype="float32")
        with torch.no_grad():
            for key, value in result.package.tensors.items():
                if key.startswith("adapter/"):
                    value.add_(torch.randn_like(value) * 0.05)
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
