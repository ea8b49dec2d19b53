"""ONNX graphs the device side assembles: what the build side exports for it with nothing folded
and the weights taken out (a device fills them from what it holds), and the opset and names both
sides share."""

from __future__ import annotations

import io
import warnings

import torch
import torch.nn as nn

from petah.errors import PetahError
from petah.tasks.anomaly import smooth

OPSET = 17
INPUT, OUTPUT = "image", "logits"


def strip_named_initializers(graph: bytes, state: dict, prefix: str) -> tuple[bytes, dict[str, str]]:
    """The graph without the initializers named ``prefix + key`` for ``state``'s keys (a device
    fills them from weights it already holds: kept once, not twice) and the index key -> name.
    Every state tensor the graph uses must be an initializer under its own name: a weight the
    exporter had renamed or folded could not be found by a device's merge."""
    import onnx

    model = onnx.load_from_string(graph)
    names = {init.name for init in model.graph.initializer}
    wanted = {prefix + key for key in state}
    # The exporter merges initializers of equal value (untrained norms are all ones / zeros) and
    # names the others through Identity nodes; each gets its own initializer back, or a task that
    # changes one of them would change them all.
    aliases = [node for node in model.graph.node
               if node.op_type == "Identity" and node.input[0] in names and node.output[0] in wanted]
    for node in aliases:
        model.graph.node.remove(node)
    names |= {node.output[0] for node in aliases}
    used = {name for node in model.graph.node for name in node.input}
    lost = sorted(name for name in used if name.startswith(prefix) and name not in names)
    if lost:
        raise PetahError(f"the exported graph lost the name of {lost[0]} (and {len(lost) - 1} more)")
    index = {key: prefix + key for key in sorted(state) if prefix + key in names}
    stripped = set(index.values())
    kept = [init for init in model.graph.initializer if init.name not in stripped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model.SerializeToString(), index


HEAD_PREFIX = "head."
HEAD_OUTPUT = "outputs"
GRAPH_HEADS = ("segmentation", "detection", "anomaly")  # heads a device runs from the graph its package carries


class _GraphHead(nn.Module):
    """A dense head as the device runs it: feature maps in (one input per stride), the task
    model's output out (segmentation: logits at the input size, as SegmentationModel gives them;
    anomaly: the smoothed distance map at the input size, as AnomalyModel gives it)."""

    def __init__(self, head: nn.Module, kind: str, img_size: int):
        super().__init__()
        self.head, self.kind, self.img_size = head, kind, img_size

    def forward(self, *maps: torch.Tensor) -> torch.Tensor:
        out = self.head(list(maps))
        if self.kind in ("segmentation", "anomaly"):
            out = torch.nn.functional.interpolate(out, size=(self.img_size, self.img_size), mode="bilinear",
                                                  align_corners=False)
        if self.kind == "anomaly":
            out = smooth(out, self.head.blur_sigma)
        return out


def head_graph(kind: str, head: nn.Module, img_size: int) -> tuple[bytes, list[str]]:
    """The head's ONNX graph without its weights (initializers ``head.KEY``, filled from the
    package's head tensors on the device) and its input names (``level_STRIDE``)."""
    strides = list(head.strides)
    inputs = [f"level_{s}" for s in strides]
    maps = tuple(torch.rand(2, c, max(2, -(-img_size // s)), max(2, -(-img_size // s)))
                 for c, s in zip(head.in_channels, strides, strict=True))
    module = _GraphHead(head.eval(), kind, img_size).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the legacy exporter is chosen deliberately (see the module doc)
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, maps, buffer, dynamo=False, opset_version=OPSET, input_names=inputs,
                              output_names=[HEAD_OUTPUT], do_constant_folding=False,
                              training=torch.onnx.TrainingMode.PRESERVE,
                              dynamic_axes={name: {0: "batch", 2: f"h{i}", 3: f"w{i}"}
                                            for i, name in enumerate(inputs)} | {HEAD_OUTPUT: {0: "batch"}})
        except Exception as exc:  # the exporter raises many types
            raise PetahError(f"cannot export the {kind} head for a device: {str(exc).splitlines()[0]}") from exc
    graph, _index = strip_named_initializers(buffer.getvalue(), head.state_dict(), HEAD_PREFIX)
    return _short_names(graph, set(inputs) | {HEAD_OUTPUT}), inputs


def _short_names(graph: bytes, keep: set[str]) -> bytes:
    """Every package carries its head graph: the exporter's long scoped names (e.g. 190 bytes per
    node of the FCOS head, 93 KB in all) become short ones; inputs, outputs and weights keep theirs."""
    import onnx

    model = onnx.load_from_string(graph)
    names: dict[str, str] = {}

    def short(name: str) -> str:
        if not name or name in keep or name.startswith(HEAD_PREFIX):
            return name
        return names.setdefault(name, f"t{len(names)}")

    for node in model.graph.node:
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
        node.name, node.doc_string = "", ""
    for init in model.graph.initializer:
        init.name = short(init.name)
    del model.graph.value_info[:]
    return model.SerializeToString()


__all__ = ["GRAPH_HEADS", "HEAD_OUTPUT", "HEAD_PREFIX", "INPUT", "OPSET", "OUTPUT", "head_graph",
           "strip_named_initializers"]
