"""The backbone for a device: one ONNX graph of the shared, unadapted backbone that a device
merges every task package into with numpy (``petah.device``), without torch.

Written as a folder (``petah export --device -b BACKBONE -o DIR``):

* ``backbone.onnx`` — the graph, its initializers named by the backbone's state-dict keys. It is
  exported with nothing folded (``TrainingMode.PRESERVE`` on the eval-mode model, no constant
  folding): BatchNorm stays a node beside its conv, a linear's weight is transposed in the graph,
  EfficientFormer's attention-bias table is gathered in the graph. Every weight a package may
  change (LoRA on convs and linears, channel scales, owned norm statistics and affines, biases) is
  therefore exactly one initializer, the index is the identity, and ONNX Runtime does the folding
  (Conv+BN fusion, transposes, constant gathers) when a device opens a task's session — the same
  graph the exporter's folding would have produced, measured to the same speed.
* ``weights.safetensors`` — the state dict (the backbone fingerprint is computed over it).
* ``device.json`` — format, the backbone's identity and preprocessing, the outputs (``pooled``
  for classification heads, ``level_S`` feature maps at stride S for dense heads), the index from
  each state-dict key to its initializer, and the sha256 of the graph and of the weights file.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save

from petah import __version__
from petah.backbones import Backbone
from petah.backbones.features import feature_levels, level_indices
from petah.device.bundle import (
    BUNDLE_FORMAT,
    BUNDLE_VERSION,
    GRAPH_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    read_device_backbone,
)
from petah.errors import PetahError
from petah.export.onnx import with_metadata
from petah.files import atomic_write_bytes, check_writable, staged_folder
from petah.packages.manifest import canonical_json
from petah.runtime.graphs import INPUT, OPSET, strip_named_initializers

POOLED = "pooled"
PREFIX = "model."  # the wrapper's attribute: initializer names are PREFIX + state-dict key


class _Trunk(nn.Module):
    """The backbone's pooled features (what a classification head sees) and its feature maps per
    stride (what dense heads see), as separate outputs: a task's graph keeps only what its head
    reads, so a classification task does not compute the maps' path and vice versa."""

    def __init__(self, model: nn.Module, indices: list[int]):
        super().__init__()
        self.model, self.indices = model, indices

    def forward(self, x: torch.Tensor):
        pooled = self.model(x)
        if not self.indices:
            return (pooled,)
        maps = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return (pooled, *maps)


def _levels(backbone: Backbone) -> list[dict]:
    """One entry per stride the backbone has (its deepest stage at that stride)."""
    try:
        levels = feature_levels(backbone.model)
    except PetahError:
        return []  # no forward_intermediates: classification only
    strides = sorted({int(level["reduction"]) for level in levels})
    indices = level_indices(backbone.model, tuple(strides))
    return [{"stride": s, "index": i, "channels": int(levels[i]["num_chs"]), "name": f"level_{s}"}
            for s, i in zip(strides, indices, strict=True)]


def export_device(backbone: Backbone, output: str | Path, weights_file: str | Path | None = None) -> dict:
    """Write the device folder for ``backbone``; returns what ``device.json`` holds.
    ``weights_file``: an existing weights file of this backbone to name instead of writing one
    (the bundled demo shares the demo backbone's file; a device then passes it when reading)."""
    output = Path(output)
    check_writable(output / MANIFEST_FILE)
    if output.exists() and not output.is_dir():
        raise PetahError(f"--output {output} must be a folder")
    levels = _levels(backbone)
    model = backbone.model.eval()
    trunk = _Trunk(model, [level["index"] for level in levels]).eval()
    size = backbone.img_size
    outputs = [POOLED] + [level["name"] for level in levels]
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter is chosen deliberately (petah.runtime.onnx)
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(trunk, (torch.zeros(2, 3, size, size),), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=outputs, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={name: {0: "batch"} for name in [INPUT, *outputs]})
        except Exception as exc:  # the exporter raises many types
            raise PetahError(f"cannot export {backbone.name} for a device: {str(exc).splitlines()[0]}") from exc
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    graph, index = strip_named_initializers(_with_value_types(buffer.getvalue()), state, PREFIX)
    graph = with_metadata(graph, {"petah.format": f"{BUNDLE_FORMAT}/{BUNDLE_VERSION}",
                                  "petah.backbone": backbone.identity()})
    weights = save(state) if weights_file is None else Path(weights_file).read_bytes()
    with torch.no_grad():
        with_maps = [m.shape[-1] for m in trunk(torch.zeros(1, 3, size, size))[1:]]
    info = {
        "format": BUNDLE_FORMAT, "format_version": BUNDLE_VERSION, "petah_version": __version__,
        "backbone": backbone.identity(), "preprocessing": backbone.preprocessing(),
        "num_features": backbone.num_features,
        "outputs": {"pooled": POOLED,
                    "levels": [{**{k: v for k, v in level.items() if k != "index"}, "grid": grid}
                               for level, grid in zip(levels, with_maps, strict=True)]},
        "index": index,
        "graph_sha256": hashlib.sha256(graph).hexdigest(), "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    with staged_folder(output) as staging:
        atomic_write_bytes(staging / GRAPH_FILE, graph)
        if weights_file is None:
            atomic_write_bytes(staging / WEIGHTS_FILE, weights)
        atomic_write_bytes(staging / MANIFEST_FILE, canonical_json(info) + b"\n")
    read_device_backbone(output, weights_file)  # what a device will check, checked before anyone ships it
    return {**info, "path": str(output), "graph_bytes": len(graph), "weights_bytes": len(weights)}


def _with_value_types(graph: bytes) -> bytes:
    """The graph with every value's element type recorded (no shapes: the batch axis stays free),
    which a device needs where it cuts the graph between a shared trunk and a task's own part."""
    import onnx
    from onnx import helper

    model = onnx.load_from_string(graph)
    inferred = onnx.shape_inference.infer_shapes(model)
    known = {value.name for value in [*model.graph.input, *model.graph.output]}
    del model.graph.value_info[:]
    model.graph.value_info.extend(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, None)
                                  for value in inferred.graph.value_info
                                  if value.name not in known and value.type.tensor_type.elem_type)
    return model.SerializeToString()


__all__ = ["export_device"]
