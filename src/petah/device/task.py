"""A task on the device: its package merged into the shared backbone's weights with numpy, and a
graph of the backbone (only the part its head reads) followed by its head, for ONNX Runtime.

The merge is the torch runtime's, in weight space: a task's owned tensors replace the backbone's,
LoRA adds ``scaling · B @ A`` to a linear's or conv's weight (a conv's update is the conv of B's
1×1 kernel over A's kernel), a channel scale multiplies a conv's output channels (weight and
bias) by ``1 + delta``. Only changed weights are new arrays; every other one is the backbone's own.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from petah.device.bundle import DeviceBackbone
from petah.errors import EngineCannotRun, PetahError
from petah.packages import Manifest, TaskPackage
from petah.packages.quantized import adapter_arrays
from petah.plans import CHANNEL_SCALE, LORA
from petah.plans.base import MAGNITUDE

LOGITS = "logits"
OUTPUTS = "outputs"
FEATURES = "features"  # a task graph's second output: what a station's drift check compares
# what the device engine runs without torch: classification (a linear head, built here) and the kinds
# whose package carries its head's graph (format 3: dense heads, anomaly's bank and its scoring)
HEAD_KINDS = ("classification", "segmentation", "detection", "anomaly")
GRAPH_HEAD_KINDS = ("segmentation", "detection", "anomaly")
RENAMED = "head::"  # the head graph's own value names, kept apart from the backbone's


def lora_delta(a: np.ndarray, b: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """B @ A as a change of a weight of ``shape`` (linear: (out, in); conv: (out, in, kh, kw))."""
    rank = a.shape[0] if a.ndim else 0
    if rank < 1 or b.size != shape[0] * rank or a.size * shape[0] != int(np.prod(shape)) * rank:
        raise PetahError(f"LoRA factors {a.shape} / {b.shape} do not fit a weight of shape {shape}")
    return (b.reshape(shape[0], rank) @ a.reshape(rank, -1)).reshape(shape)


def dora_rows(weight: np.ndarray, magnitude: np.ndarray, origin: str, module: str) -> np.ndarray:
    """DoRA's merge (PEFT's): each output row of the LoRA-updated weight rescaled to its trained
    magnitude, ``m / ‖W + s·B·A‖`` row by row (the bias stays as it is)."""
    magnitude = np.asarray(magnitude, dtype=np.float32)
    if magnitude.shape != (weight.shape[0],) or not np.all(np.isfinite(magnitude)):
        raise PetahError(f"{origin}: the DoRA magnitude of {module} must be {weight.shape[0]} finite values, "
                         f"got shape {magnitude.shape}")
    norms = np.sqrt(np.square(weight.reshape(weight.shape[0], -1)).sum(axis=1))
    return weight * (magnitude / norms).reshape((-1,) + (1,) * (weight.ndim - 1))


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
    adapters = adapter_arrays(package, origin)
    config = manifest.plan.plan_config()
    for target in manifest.plan.targets:
        key = f"{target.module}.weight"
        weight = current(key)
        if target.method == LORA:
            a = np.asarray(adapters[f"{target.module}.lora_A"], dtype=np.float32)
            b = np.asarray(adapters[f"{target.module}.lora_B"], dtype=np.float32)
            updated = weight + np.float32(config.lora_scaling(a.shape[0])) * lora_delta(a, b, weight.shape)
            if config.dora:
                updated = dora_rows(updated, adapters[f"{target.module}.{MAGNITUDE}"], origin, target.module)
            changed[key] = updated
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
class Trunk:
    """The part of the backbone before a task's first changed weight: one graph for every task that
    leaves the same leading part alone, run once per batch for all of them."""

    key: str  # equal for equal trunks
    graph: bytes
    cut: list[str]  # its outputs: what the tasks' own parts read
    weight_bytes: int


@dataclass
class TaskGraph:
    manifest: Manifest
    graph: bytes  # image -> answer; with a trunk: the trunk's outputs (``trunk.cut``) -> answer
    changed_bytes: int  # what the task holds beside the backbone's weights (merged weights + head)
    trunk: Trunk | None = None
    own_weight_bytes: int = 0  # the weights its own graph holds (its part of the backbone, merged, and its head)


def _needed_nodes(graph, outputs: set[str]) -> list:
    """The nodes the given outputs depend on, in the graph's (topological) order."""
    needed, keep = set(outputs), []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            keep.append(node)
            needed.update(name for name in node.input if name)
    return keep[::-1]


def linear_head(manifest: Manifest, tensors: dict, backbone: DeviceBackbone, origin: str):
    """A classification head as graph nodes: Gemm over the pooled features."""
    from onnx import helper, numpy_helper

    head = manifest.head
    if head.get("type") != "linear":
        raise PetahError(f"{origin}: a classification head of type {head.get('type')!r} is not one this petah knows")
    weight, bias = tensors.get("weight"), tensors.get("bias")
    classes = len(manifest.labels)
    if (weight is None or bias is None or weight.shape != (classes, backbone.num_features)
            or bias.shape != (classes,)):
        raise PetahError(f"{origin}: its head does not fit {backbone.num_features} features and {classes} classes")
    pooled = backbone.outputs["pooled"]
    nodes = [helper.make_node("Gemm", [pooled, "head.weight", "head.bias"], [LOGITS], transB=1)]
    initializers = [numpy_helper.from_array(np.asarray(weight, np.float32), "head.weight"),
                    numpy_helper.from_array(np.asarray(bias, np.float32), "head.bias")]
    output = helper.make_tensor_value_info(LOGITS, 1, ["batch", classes])  # 1: FLOAT
    return [pooled], nodes, initializers, output


def graph_head(manifest: Manifest, package: TaskPackage, backbone: DeviceBackbone, origin: str):
    """A dense head from the graph its package carries: its value names kept apart from the
    backbone's, its inputs the backbone's feature maps, its weights the package's head tensors."""
    import onnx
    from onnx import numpy_helper

    from petah.packages.manifest import GRAPH_TENSOR

    if not manifest.head.get("graph") or GRAPH_TENSOR not in package.tensors:
        raise EngineCannotRun(f"{origin} has no head graph (made before format 3): run `petah upgrade` on it on a "
                              "build machine, or serve it with --engine torch on the full install")
    try:
        head = onnx.load_from_string(np.asarray(package.tensors[GRAPH_TENSOR], np.uint8).tobytes())
    except Exception as exc:  # protobuf raises several types for bad bytes
        raise PetahError(f"{origin}: its head graph is not a readable ONNX graph ({type(exc).__name__})") from None
    check_head_graph(head, origin)
    inputs = [name for name in str(manifest.head.get("graph_inputs", "")).split(",") if name]
    levels = {level["name"] for level in backbone.outputs.get("levels", [])}
    graph_inputs = [value.name for value in head.graph.input]
    if not inputs or graph_inputs != inputs or not set(inputs) <= levels or len(head.graph.output) != 1:
        raise PetahError(f"{origin}: its head graph reads {graph_inputs}, which {backbone.describe()} does not give")
    tensors = package.section("head")
    weights = {f"head.{key}": value for key, value in tensors.items()}
    keep = set(inputs) | set(weights)

    def rename(name: str) -> str:
        return name if not name or name in keep else RENAMED + name

    nodes = []
    for node in head.graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = rename(node.name)
        nodes.append(node)
    used = {name for node in nodes for name in node.input}
    missing = sorted(name for name in used if name.startswith("head.") and name not in weights)
    if missing:
        raise PetahError(f"{origin}: its head graph needs {missing[0]}, which the package does not hold")
    initializers = []
    for init in head.graph.initializer:
        init.name = rename(init.name)
        initializers.append(init)
    initializers += [numpy_helper.from_array(_compute_type(value), name) for name, value in weights.items()
                     if name in used]
    output = head.graph.output[0]
    nodes.append(onnx.helper.make_node("Identity", [rename(output.name)], [OUTPUTS]))
    output.name = OUTPUTS
    return inputs, nodes, initializers, output


# What the exporter writes for petah's heads (FPN segmentation, FCOS detection, the anomaly bank's
# scoring) and the few ops of their kind: a head graph is untrusted input, so nothing else runs.
HEAD_OPS = frozenset({
    "Add", "AveragePool", "BatchNormalization", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div",
    "Flatten", "Gather",
    "Gemm", "GlobalAveragePool", "Identity", "InstanceNormalization", "MatMul", "Max", "MaxPool", "Min", "Mul", "Neg",
    "Pad", "Pow", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceSum", "Relu", "Reshape", "Resize", "Shape",
    "Sigmoid", "Slice", "Softmax", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Clip", "Exp", "Sum",
})
MAX_HEAD_TENSOR_BYTES = 64 * 2**20
OPSET_OF_HEADS = 17  # petah.runtime.graphs.OPSET


def check_head_graph(head, origin: str) -> None:
    """Refuse a head graph that could do more than compute a head: other operator domains or types
    (ONNX Runtime's contrib ops, subgraphs), another opset, functions, tensors stored outside the
    graph (ONNX Runtime would read a file of the device when the session opens) or huge ones."""
    from onnx import AttributeProto, TensorProto

    def refuse(what: str) -> PetahError:
        return PetahError(f"{origin}: its head graph {what}, which a petah head does not hold")

    opsets = {entry.domain: entry.version for entry in head.opset_import}
    if set(opsets) - {"", "ai.onnx"} or opsets.get("", opsets.get("ai.onnx")) != OPSET_OF_HEADS:
        raise refuse(f"uses opsets {opsets}")
    if head.functions or head.graph.sparse_initializer:
        raise refuse("holds functions or sparse tensors")

    def check_tensor(tensor) -> None:
        if tensor.data_location == TensorProto.EXTERNAL or tensor.external_data:
            raise refuse("points a tensor at an outside file")
        elements = int(np.prod([max(0, int(d)) for d in tensor.dims] or [1], dtype=np.float64))
        if len(tensor.raw_data) > MAX_HEAD_TENSOR_BYTES or elements * 4 > MAX_HEAD_TENSOR_BYTES:
            raise refuse("holds a tensor over 64 MiB")

    for tensor in head.graph.initializer:
        check_tensor(tensor)
    for node in head.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in HEAD_OPS:
            raise refuse(f"runs {node.domain + '.' if node.domain else ''}{node.op_type}")
        for attribute in node.attribute:
            if attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS, AttributeProto.SPARSE_TENSOR,
                                  AttributeProto.SPARSE_TENSORS):
                raise refuse("holds a subgraph or sparse attribute")
            if attribute.type == AttributeProto.TENSOR:
                check_tensor(attribute.t)
            for tensor in attribute.tensors:
                check_tensor(tensor)


def _compute_type(value: np.ndarray) -> np.ndarray:
    """A head tensor as the graph computes with it: 16-bit floats (a bank stored in fp16) as float32."""
    value = np.asarray(value)
    return value.astype(np.float32) if value.dtype.kind == "f" or str(value.dtype) == "bfloat16" else value


def task_graph(backbone: DeviceBackbone, package: TaskPackage, origin: str) -> TaskGraph:
    """The task's graph with every weight in it (ONNX Runtime folds and packs it when a session
    opens): the part of the backbone its head reads, then the head."""
    import onnx
    from onnx import helper, numpy_helper

    manifest = package.manifest
    kind = manifest.task.kind
    if kind not in HEAD_KINDS:
        raise EngineCannotRun(f"{origin} is a {kind} task; the device engine runs {', '.join(HEAD_KINDS)} tasks "
                         "(serve it with --engine torch on the full install)")
    if kind in GRAPH_HEAD_KINDS:
        reads, head_nodes, head_initializers, output = graph_head(manifest, package, backbone, origin)
    else:
        reads, head_nodes, head_initializers, output = linear_head(manifest, package.section("head"), backbone,
                                                                    origin)
    changed = merged_weights(backbone, package, origin)
    model = onnx.load_from_string(backbone.graph)
    feature_nodes, features = feature_output(backbone, reads)
    head_nodes = head_nodes + feature_nodes
    nodes = _needed_nodes(model.graph, set(reads)) + head_nodes
    weights = {name: changed.get(key, backbone.weights[key]) for key, name in backbone.index.items()}
    constants = {init.name: init for init in model.graph.initializer} | {init.name: init for init in head_initializers}

    def build(part: list, inputs: list, outputs: list) -> tuple[bytes, int]:
        used = {name for node in part for name in node.input}
        initializers = [constants[name] for name in sorted(used & set(constants))]
        arrays = [numpy_helper.from_array(weights[name], name) for name in sorted(used & set(weights))]
        graph = helper.make_graph(part, "task", inputs, outputs, initializers + arrays)  # equal trunks, equal bytes
        made = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
        return made.SerializeToString(), sum(int(weights[n].nbytes) for n in used & set(weights))

    head_bytes = sum(int(np.asarray(v).nbytes) for v in package.section("head").values())
    changed_bytes = sum(int(a.nbytes) for a in changed.values()) + head_bytes
    image = list(model.graph.input)
    split = _split_trunk(nodes, len(head_nodes), {backbone.index[k] for k in changed if k in backbone.index},
                         image[0].name, backbone)
    if split is None:
        graph, own = build(nodes, image, [output, features])
        return TaskGraph(manifest, graph, changed_bytes, None, own + head_bytes)
    trunk_nodes, task_nodes, cut = split
    typed = _cut_types(backbone, cut)
    trunk_graph, trunk_bytes = build(trunk_nodes, image, typed)
    key = hashlib.sha256(trunk_graph).hexdigest()
    graph, own = build(task_nodes, typed, [output, features])
    return TaskGraph(manifest, graph, changed_bytes, Trunk(key, trunk_graph, cut, trunk_bytes), own + head_bytes)


def deepest_read(backbone: DeviceBackbone, reads: list[str]) -> str | None:
    """The feature level of largest stride among ``reads`` (None: the head reads the pooled features)."""
    strides = {level["name"]: int(level["stride"]) for level in backbone.outputs.get("levels", [])}
    levels = [name for name in reads if name in strides]
    return max(levels, key=strides.__getitem__) if levels else None


def feature_output(backbone: DeviceBackbone, reads: list[str]):
    """Nodes giving a task's drift features (``petah.tasks.reference.model_features``): the pooled
    features a classification head reads, else the deepest level it reads averaged over positions."""
    from onnx import helper

    deepest = deepest_read(backbone, reads)
    if deepest is None:
        nodes = [helper.make_node("Identity", [reads[0]], [FEATURES])]
    else:
        nodes = [helper.make_node("GlobalAveragePool", [deepest], [f"{FEATURES}::pooled"]),
                 helper.make_node("Flatten", [f"{FEATURES}::pooled"], [FEATURES], axis=1)]
    return nodes, helper.make_tensor_value_info(FEATURES, 1, ["batch", None])  # 1: FLOAT


MIN_TRUNK_FRACTION = 0.1  # a shorter unchanged lead is not worth a second session per batch


def _split_trunk(nodes: list, head_count: int, changed: set[str], image: str, backbone: DeviceBackbone):
    """(trunk nodes, task nodes, cut values) where the task leaves a leading part of the backbone
    unchanged, or None. A node is the task's when it reads a changed weight or a value of the task's
    (the head's nodes always are); the trunk is every other node that depends on the image; nodes of
    constants alone go with whoever reads them."""
    own_values: set[str] = set()
    from_image: set[str] = {image}
    mine = [False] * len(nodes)
    for i, node in enumerate(nodes):
        if i >= len(nodes) - head_count or any(n in changed or n in own_values for n in node.input):
            mine[i] = True
            own_values.update(node.output)
        if any(n in from_image for n in node.input):
            from_image.update(node.output)
    constant = [node for node, m in zip(nodes, mine, strict=True)
                if not m and not any(n in from_image for n in node.output)]
    trunk = [node for node, m in zip(nodes, mine, strict=True)
             if not m and any(n in from_image for n in node.output)]
    task = [node for node, m in zip(nodes, mine, strict=True) if m]
    trunk_outputs = {n for node in trunk for n in node.output}
    cut = sorted({n for node in task for n in node.input} & trunk_outputs)
    shared = {n for node in trunk for n in node.input if n in backbone.index.values()}
    shared_bytes = sum(int(backbone.weights[k].nbytes) for k, v in backbone.index.items() if v in shared)
    if not cut or shared_bytes < MIN_TRUNK_FRACTION * backbone.resident_bytes:
        return None
    order = {id(node): i for i, node in enumerate(nodes)}

    def with_constants(part: list) -> list:
        """``part`` and the constant computations (no image in them) it reads, in graph order."""
        needed, extra = {n for node in part for n in node.input}, []
        for node in reversed(constant):
            if needed.intersection(node.output):
                extra.append(node)
                needed.update(node.input)
        return sorted(part + extra, key=lambda node: order[id(node)])

    return with_constants(trunk), with_constants(task), cut


def _cut_types(backbone: DeviceBackbone, cut: list[str]) -> list:
    """Typed graph inputs / outputs for the cut values (their element type from the backbone graph)."""
    from onnx import helper

    types = backbone.value_types()
    return [helper.make_tensor_value_info(name, types.get(name) or 1, None) for name in cut]  # 1: FLOAT


__all__ = ["FEATURES", "GRAPH_HEAD_KINDS", "HEAD_KINDS", "HEAD_OPS", "LOGITS", "OUTPUTS", "TaskGraph", "Trunk",
           "check_head_graph", "deepest_read", "feature_output", "lora_delta", "merged_weights",
           "task_graph"]
