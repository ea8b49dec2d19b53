"""A task on the device: its package merged into the shared backbone's weights with numpy, and a
graph of the backbone (only the part its head reads) followed by its head, for ONNX Runtime.

The merge is the torch runtime's, in weight space: a task's owned tensors replace the backbone's,
LoRA adds ``scaling · B @ A`` to a linear's or conv's weight (a conv's update is the conv of B's
1×1 kernel over A's kernel), a channel scale multiplies a conv's output channels (weight and
bias) by ``1 + delta``. Only changed weights are new arrays; every other one is the backbone's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from petah.device.bundle import DeviceBackbone
from petah.errors import PetahError
from petah.packages import Manifest, TaskPackage
from petah.plans import CHANNEL_SCALE, LORA, PlanConfig

LOGITS = "logits"
HEAD_KINDS = ("classification",)  # what the device engine can run without torch (dense heads: next)


def lora_scaling(config: PlanConfig) -> float:
    """PEFT's scaling of every layer of a plan: alpha / rank, with petah's per-layer alpha kept at
    ``alpha · rank_layer / rank`` (petah.adapters.model.lora_config), so it is one number."""
    return config.lora_alpha / config.rank


def lora_delta(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """B @ A as a change of a weight of ``shape`` (linear: (out, in); conv: (out, in, kh, kw))."""
    rank = a.shape[0]
    delta = b.reshape(b.shape[0], rank) @ a.reshape(rank, -1)
    if delta.size != int(np.prod(shape)):
        raise PetahError(f"LoRA factors {a.shape} / {b.shape} do not fit a weight of shape {shape}")
    return delta.reshape(shape)


def merged_weights(backbone: DeviceBackbone, package: TaskPackage, origin: str) -> dict[str, np.ndarray]:
    """The weights the task changes (state-dict key -> float32 array); the rest stay the backbone's."""
    manifest = package.manifest
    weights = backbone.weights
    changed: dict[str, np.ndarray] = {}

    def current(key: str) -> np.ndarray:
        if key not in weights:
            raise PetahError(f"{origin} changes {key}, which {backbone.describe()} lacks")
        return changed[key] if key in changed else weights[key].astype(np.float32)

    for key, value in package.section("override").items():
        have = weights.get(key)
        if have is None:
            raise PetahError(f"{origin} owns {key}, which {backbone.describe()} lacks")
        if tuple(value.shape) != tuple(have.shape):
            raise PetahError(f"{origin}: override {key} has shape {tuple(value.shape)}, the backbone's "
                             f"{tuple(have.shape)}")
        changed[key] = np.asarray(value, dtype=have.dtype)
    adapters = package.section("adapter")
    config = manifest.plan.plan_config()
    scaling = lora_scaling(config)
    for target in manifest.plan.targets:
        key = f"{target.module}.weight"
        weight = current(key)
        if target.method == LORA:
            a = np.asarray(adapters[f"{target.module}.lora_A"], dtype=np.float32)
            b = np.asarray(adapters[f"{target.module}.lora_B"], dtype=np.float32)
            changed[key] = weight + np.float32(scaling) * lora_delta(a, b, weight.shape)
        elif target.method == CHANNEL_SCALE:
            scale = 1.0 + np.asarray(adapters[f"{target.module}.scale_delta"], dtype=np.float32)
            if scale.shape != (weight.shape[0],):
                raise PetahError(f"{origin}: the channel scale of {target.module} has {scale.shape} values, "
                                 f"the layer {weight.shape[0]} channels")
            changed[key] = weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
            bias_key = f"{target.module}.bias"
            if bias_key in weights:
                changed[bias_key] = current(bias_key) * scale
    return changed


@dataclass
class TaskGraph:
    manifest: Manifest
    graph: bytes
    changed_bytes: int  # what the task holds beside the backbone's weights (merged weights + head)


def _needed_nodes(graph, outputs: set[str]) -> list:
    """The nodes the given outputs depend on, in the graph's (topological) order."""
    needed, keep = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    return keep[::-1]


def task_graph(backbone: DeviceBackbone, package: TaskPackage, origin: str) -> TaskGraph:
    """The task's graph with every weight in it (ONNX Runtime folds and packs it when a session opens)."""
    import onnx
    from onnx import helper, numpy_helper

    manifest = package.manifest
    kind = manifest.task.kind
    if kind not in HEAD_KINDS:
        raise PetahError(f"{origin} is a {kind} task; the device engine runs {', '.join(HEAD_KINDS)} tasks "
                         "(serve it with --engine torch on the full install)")
    head = manifest.head
    if head.get("type") != "linear":
        raise PetahError(f"{origin}: a classification head of type {head.get('type')!r} is not one this petah knows")
    tensors = package.section("head")
    weight, bias = tensors.get("weight"), tensors.get("bias")
    classes = len(manifest.labels)
    if (weight is None or bias is None or weight.shape != (classes, backbone.num_features)
            or bias.shape != (classes,)):
        raise PetahError(f"{origin}: its head does not fit {backbone.num_features} features and {classes} classes")
    changed = merged_weights(backbone, package, origin)
    model = onnx.load_from_string(backbone.graph)
    pooled = backbone.outputs["pooled"]
    nodes = _needed_nodes(model.graph, {pooled})
    nodes.append(helper.make_node("Gemm", [pooled, "head.weight", "head.bias"], [LOGITS], transB=1))
    used = {name for node in nodes for name in node.input}
    initializers = [init for init in model.graph.initializer if init.name in used]
    for key, name in backbone.index.items():
        if name in used:
            initializers.append(numpy_helper.from_array(changed.get(key, backbone.weights[key]), name))
    initializers += [numpy_helper.from_array(np.asarray(weight, np.float32), "head.weight"),
                     numpy_helper.from_array(np.asarray(bias, np.float32), "head.bias")]
    batch = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param or "batch"
    out = helper.make_graph(nodes, f"{manifest.task.name}", list(model.graph.input),
                            [helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, [batch, classes])],
                            initializers)
    merged = helper.make_model(out, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    changed_bytes = sum(int(a.nbytes) for a in changed.values()) + int(weight.size + bias.size) * 4
    return TaskGraph(manifest, merged.SerializeToString(), changed_bytes)


__all__ = ["HEAD_KINDS", "LOGITS", "TaskGraph", "lora_delta", "lora_scaling", "merged_weights", "task_graph"]
