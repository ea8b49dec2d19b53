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
from torch.utils.data import DataLoader

from petah import __version__
from petah.backbones import Backbone
from petah.errors import PetahError
from petah.files import atomic_write_bytes, check_writable
from petah.packages import TaskPackage, TrustPolicy, read_trusted
from petah.runtime.attach import load_task
from petah.runtime.onnx import INPUT, merged_task_module, to_onnx_bytes


@dataclass
class ExportResult:
    task: str
    path: Path
    onnx_bytes: int
    max_abs_error: float  # ONNX Runtime vs the unmerged PyTorch task on the parity inputs (float graph)
    int8: dict | None = None  # the quantization report (petah.export.int8.Int8Report)

    def to_dict(self) -> dict:
        return {"task": self.task, "path": str(self.path), "onnx_bytes": self.onnx_bytes,
                "max_abs_error": self.max_abs_error, **({"int8": self.int8} if self.int8 else {})}


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


def calibration_batches(manifest, train, count: int, seed: int = 0, check_classes: bool = True) -> list[np.ndarray]:
    """``count`` images drawn from ``train`` (checked to be of the task's kind, and classes), as
    the task's preprocessing gives them to its graph."""
    from petah.data import Preprocess
    from petah.export.int8 import CALIBRATION_BATCH, batches
    from petah.tasks import kind_for_data, task_kind

    kind = task_kind(manifest.task.kind)
    if kind_for_data(train) is not kind:
        raise PetahError(f"task {manifest.task.name} is a {kind.kind} task; the calibration data is labelled for "
                         f"{kind_for_data(train).kind}")
    if check_classes and list(train.classes) != list(manifest.labels):
        raise PetahError(f"the calibration data's classes {list(train.classes)[:4]}… differ from task "
                         f"{manifest.task.name}'s {list(manifest.labels)[:4]}…")
    if count < 1:
        raise PetahError(f"--calibration-images must be at least 1, got {count}")
    picked = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return batches(kind, train.subset(picked.tolist()), Preprocess.from_dict(manifest.preprocessing),
                   CALIBRATION_BATCH)


def calibration_sets(manifest, data: tuple, count: int, seed: int = 0) -> tuple[list[np.ndarray], list[tuple]]:
    """(calibration batches drawn from the training part, validation batches): the task's own images."""
    from petah.data import Preprocess
    from petah.tasks import task_kind

    train, val = data
    calibration = calibration_batches(manifest, train, count, seed)
    view = task_kind(manifest.task.kind).view(val, Preprocess.from_dict(manifest.preprocessing))
    loader = DataLoader(view, batch_size=32, shuffle=False, collate_fn=getattr(view, "collate", None))
    return calibration, list(loader)


def export_merged(
    backbone: Backbone, package: TaskPackage | str | Path, output: str | Path, real_inputs: torch.Tensor | None = None,
    *, int8: str | None = None, data: tuple | None = None, calibration_images: int = 64,
    trust: TrustPolicy | None = None,
) -> ExportResult:
    """Write one ONNX model for a task (adapters merged) and check it against PyTorch; with
    ``int8`` (always | auto), quantized on ``data`` (the task's (train, val) images). ``trust``:
    who must have signed the package."""
    package, _origin = read_trusted(package, trust)
    check_writable(output)
    calibration = validation = None
    if int8 is not None:  # every check before the (slow) export
        from petah.export.int8 import MODES

        if int8 not in MODES:
            raise PetahError(f"--int8 takes {' | '.join(MODES)}, got {int8!r}")
        if data is None:
            raise PetahError("int8 export needs the task's images to calibrate on: --data (the set it was "
                             "trained on, or one like it)")
        calibration, validation = calibration_sets(package.manifest, data, calibration_images)
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
    report = None
    if int8 is not None:
        from petah.export.int8 import int8_graph
        from petah.tasks import task_kind

        onnx_bytes, report = int8_graph(onnx_bytes, module.head, task_kind(manifest.task.kind), calibration,
                                        mode=int8, validation=validation, classes=list(manifest.labels))
        report = report.to_dict()
        # what stayed float, and (auto) why a float graph was written
        onnx_bytes = with_metadata(onnx_bytes, {"petah.int8": {
            k: report[k] for k in ("mode", "quantized", "reason", "quantized_nodes", "float_nodes", "float_op_types",
                                   "calibration_images")}})
    path = atomic_write_bytes(Path(output), onnx_bytes)
    return ExportResult(manifest.task.name, path, len(onnx_bytes), error, report)
