"""A task as an ONNX graph, for ONNX Runtime: its adapters merged, exported in memory.

Device side (the station's onnx engine compiles a package it installs) and build side
(``petah export`` writes the same graph to a file) share it. The exporter is torch's
TorchScript-based one (``dynamo=False``): torch 2.14's default dynamo exporter needs
``onnxscript``, and the traced graph of a merged, wrapper-free timm model is plain convolutions
and matmuls that the legacy path exports exactly. The batch axis is dynamic.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from petah.backbones import Backbone
from petah.errors import PetahError
from petah.packages import Manifest, TaskPackage
from petah.runtime.attach import merged_backbone
from petah.runtime.graphs import INPUT, OPSET, OUTPUT


def merged_task_module(backbone: Backbone, package: TaskPackage | str | Path) -> tuple[nn.Module, Manifest]:
    """The task as a plain module: backbone with adapters merged (no wrappers) + head."""
    merged, task = merged_backbone(backbone, package)
    module = type(task.model)(merged.model, task.model.head).eval()
    return module, task.manifest


def merged_task_graph(backbone: Backbone, package: TaskPackage | str | Path,
                      what: str) -> tuple[bytes, nn.Module, Manifest]:
    """The task's merged module exported (traced on zeros: the graph does not depend on values),
    the module (its head decodes the graph's output) and the manifest."""
    module, manifest = merged_task_module(backbone, package)
    size = backbone.img_size
    return to_onnx_bytes(module, torch.zeros(2, 3, size, size), what), module, manifest


class _LayerTracker:
    """Remembers which module was running, so an export failure can name the layer."""

    def __init__(self, model: nn.Module):
        self.stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name)))
            self.handles.append(module.register_forward_hook(self._leave))

    def _enter(self, name: str):
        def hook(module, args) -> None:  # a hook that returns something would replace the input
            self.stack.append(name)

        return hook

    def _leave(self, module, args, output) -> None:
        self.stack.pop()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def to_onnx_bytes(module: nn.Module, example: torch.Tensor, what: str) -> bytes:
    tracker = _LayerTracker(module)
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the legacy exporter is chosen deliberately (see the module doc)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module, (example,), buffer, dynamo=False, opset_version=OPSET,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            )
    except Exception as exc:  # the exporter raises many types
        layer = tracker.stack[-1] if tracker.stack else "(model)"
        kind = type(module.get_submodule(layer)).__name__ if tracker.stack else ""
        raise PetahError(f"cannot export {what} to ONNX: layer {layer} ({kind}) failed: "
                         f"{str(exc).splitlines()[0]}") from exc
    finally:
        tracker.close()
    return buffer.getvalue()


__all__ = ["INPUT", "OPSET", "OUTPUT", "merged_task_graph", "merged_task_module", "to_onnx_bytes"]
