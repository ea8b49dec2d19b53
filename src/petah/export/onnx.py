"""ONNX export of a task with its adapters merged: one self-contained model per task.

The graph itself comes from ``petah.runtime.onnx`` (the station's onnx engine builds the same
one); here it gets preprocessing, labels and the backbone identity as metadata, so a device
needs nothing else, and is checked against PyTorch and written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from petah import __version__
from petah.backbones import Backbone
from petah.files import atomic_write_bytes
from petah.packages import TaskPackage, load_task, read_package
from petah.runtime.onnx import INPUT, merged_task_module, to_onnx_bytes


@dataclass
class ExportResult:
    task: str
    path: Path
    onnx_bytes: int
    max_abs_error: float  # ONNX Runtime vs the unmerged PyTorch task on the parity inputs

    def to_dict(self) -> dict:
        return {"task": self.task, "path": str(self.path), "onnx_bytes": self.onnx_bytes,
                "max_abs_error": self.max_abs_error}


def with_metadata(onnx_bytes: bytes, metadata: dict[str, object]) -> bytes:
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    return model.SerializeToString()


def worst_error(worst: float, got: np.ndarray, want: np.ndarray) -> float:
    """The running max |got - want|; NaN counts as infinitely wrong (``max`` would drop it)."""
    error = float(np.abs(got - want).max())
    return float("inf") if np.isnan(error) else max(worst, error)


def max_onnx_error(onnx_bytes: bytes, module: nn.Module, inputs: list[torch.Tensor]) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got = session.run(None, {INPUT: x.numpy()})[0]
            worst = worst_error(worst, got, module(x).numpy())
    return worst


def export_merged(
    backbone: Backbone, package: TaskPackage | str | Path, output: str | Path, real_inputs: torch.Tensor | None = None
) -> ExportResult:
    """Write one ONNX model for a task (adapters merged) and check it against PyTorch."""
    if not isinstance(package, TaskPackage):
        package = read_package(package)
    module, manifest = merged_task_module(backbone, package)
    size = backbone.img_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=gen)
    onnx_bytes = to_onnx_bytes(module, example, f"task {manifest.task.name} on {backbone.name}")
    onnx_bytes = with_metadata(onnx_bytes, {
        "petah.format": "petah-onnx-merged/1",
        "petah.version": __version__,
        "petah.task": manifest.task.to_dict(),
        "petah.head": {k: v for k, v in manifest.head.items() if k != "tensors"},  # dense outputs: strides, layout
        "petah.backbone": {k: manifest.backbone.to_dict()[k] for k in ("name", "img_size", "fingerprint")},
        "petah.preprocessing": manifest.preprocessing,
        "petah.input": "float32 [batch, 3, H, W], RGB, (pixel / 255 - mean) / std",
    })
    parity_inputs = [torch.randn(b, 3, size, size, generator=gen) for b in (1, 3)]
    if real_inputs is not None:
        parity_inputs.append(real_inputs)
    # the reference is the task as trained: unmerged adapters, PyTorch
    error = max_onnx_error(onnx_bytes, load_task(backbone, package).model, parity_inputs)
    path = atomic_write_bytes(Path(output), onnx_bytes)
    return ExportResult(manifest.task.name, path, len(onnx_bytes), error)
