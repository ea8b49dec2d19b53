"""Tasks held on the shared base: one ONNX Runtime session of the unmerged backbone for every such
task, with each adapter kept beside its layer as a branch whose tensors are graph inputs; a task
feeds its own at run time, then its head runs as a small session of its own.

A task held this way costs about its package (its factors in float32, its head), not a backbone
copy, at a measured speed cost (docs/deploy.md, "How a task is held"): the station holds its
busiest tasks merged and the rest here, within its memory budget.

Branches sit after the layer's BatchNorm, so ONNX Runtime still fuses every conv with its norm
(a branch between them stops the fusion: measured slower). Per layer, on its output ``y``:
  LoRA           y + conv(conv(x, A), B')   B' = scaling · k · B, k = γ/√(var+ε) of the norm (1 without)
  channel scale  s · y + (1 − s) · t        t = β − k·μ of the norm (0 without): exactly BN(s · conv)
Both equal the torch runtime's merge in weight space (tested against the merged graph).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from petah.device.bundle import DeviceBackbone
from petah.device.task import GRAPH_HEAD_KINDS, HEAD_KINDS, graph_head, linear_head
from petah.errors import EngineCannotRun, PetahError
from petah.packages import TaskPackage
from petah.packages.quantized import adapter_arrays
from petah.plans import CHANNEL_SCALE, LORA

FLOAT = 1  # onnx.TensorProto.FLOAT


class NotOnBase(Exception):
    """The task's package holds something the shared base cannot carry as a branch (it is held merged)."""


@dataclass(frozen=True)
class Site:
    """Where a layer's adapter joins the backbone graph: its input, the value its branch is added
    to (the norm's output where a norm follows alone), and what the branch needs to match. A layer
    may run at several places (the device graph computes pooled features and feature levels on
    paths of their own): each gets the branch, with the same tensors."""

    module: str
    kind: str  # "conv" | "linear"
    places: tuple[tuple[str, str], ...]  # (the layer's input value, the value the branch changes), per place
    shape: tuple[int, ...]  # the weight's
    conv: dict  # a conv's strides / pads / dilations
    groups: int
    norm_scale: np.ndarray | None  # k = γ/√(var+ε) of the norm after it, per output channel
    norm_shift: np.ndarray | None  # t = β − k·μ


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def adapter_sites(backbone: DeviceBackbone) -> dict[str, Site]:
    """Every conv and linear of the backbone graph a branch can join, by module name (cached)."""
    cached = getattr(backbone, "_sites", None)
    if cached is not None:
        return cached
    import onnx

    model = onnx.load_from_string(backbone.graph)
    readers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {value.name for value in model.graph.output}
    initializer_of = {name: key for key, name in backbone.index.items()}

    def only_reader(value: str):
        nodes = readers.get(value, [])
        return nodes[0] if len(nodes) == 1 and value not in graph_outputs else None

    sites = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) >= 2 and node.input[1] in initializer_of:
            key = initializer_of[node.input[1]]
            attrs = _attributes(node)
            if not key.endswith(".weight"):
                continue
            module, output = key[: -len(".weight")], node.output[0]
            scale = shift = None
            norm = only_reader(output)
            if norm is not None and norm.op_type == "BatchNormalization" and norm.input[0] == output:
                gamma, beta, mean, var = (backbone.weights[initializer_of[n]] for n in norm.input[1:5])
                eps = float(_attributes(norm).get("epsilon", 1e-5))
                scale = (gamma / np.sqrt(var + eps)).astype(np.float32)
                shift = (beta - scale * mean).astype(np.float32)
                output = norm.output[0]
            conv = {name: list(attrs[name]) for name in ("strides", "pads", "dilations") if name in attrs}
            _add_place(sites, Site(module, "conv", ((node.input[0], output),), tuple(backbone.weights[key].shape),
                                   conv, int(attrs.get("group", 1)), scale, shift))
        elif node.op_type in ("Gemm", "Transpose") and len(node.input) >= 1:
            site = _linear_site(node, readers, initializer_of, backbone)
            if site is not None:
                _add_place(sites, site)
    backbone._sites = {module: site for module, site in sites.items() if site is not None}
    return backbone._sites


def _add_place(sites: dict, site: Site) -> None:
    """Record a layer's place; a layer whose places differ (another norm after it) gets no site."""
    have = sites.get(site.module, site)
    if have is None:
        return
    if have is site:
        sites[site.module] = site
        return
    same = (have.kind, have.shape, have.conv, have.groups) == (site.kind, site.shape, site.conv, site.groups) and all(
        (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
        for a, b in ((have.norm_scale, site.norm_scale), (have.norm_shift, site.norm_shift)))
    sites[site.module] = dataclasses.replace(have, places=have.places + site.places) if same else None


def _linear_site(node, readers: dict, initializer_of: dict, backbone: DeviceBackbone) -> Site | None:
    """A linear as the exporter writes it: Gemm(x, W, transB=1) with its bias, or MatMul(x, Transpose(W))
    then Add(bias)."""
    weight = node.input[1] if node.op_type == "Gemm" else node.input[0]
    key = initializer_of.get(weight)
    if key is None or not key.endswith(".weight") or backbone.weights[key].ndim != 2:
        return None
    module = key[: -len(".weight")]
    if node.op_type == "Gemm":
        attrs = _attributes(node)
        if attrs.get("transB", 0) != 1 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            return None
        return Site(module, "linear", ((node.input[0], node.output[0]),), tuple(backbone.weights[key].shape), {}, 1,
                    None, None)
    if _attributes(node).get("perm") not in (None, [1, 0]):
        return None
    users = readers.get(node.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[1] != node.output[0]:
        return None
    output = users[0].output[0]
    after = readers.get(output, [])
    bias = f"{module}.bias"
    if len(after) == 1 and after[0].op_type == "Add" and any(initializer_of.get(n) == bias for n in after[0].input):
        output = after[0].output[0]  # the bias is scaled with the weight: the branch joins after it
    return Site(module, "linear", ((users[0].input[0], output),), tuple(backbone.weights[key].shape), {}, 1, None,
                None)


def input_names(module: str) -> dict[str, str]:
    return {part: f"adapter::{module}::{part}" for part in ("A", "B", "mul", "add")}


def base_adapters(backbone: DeviceBackbone, package: TaskPackage, origin: str) -> dict[str, tuple[str, np.ndarray]]:
    """The task's branch tensors, by graph input name: (module, float32 array). Raises NotOnBase
    with the reason when its package holds what no branch carries."""
    manifest = package.manifest
    if package.section("override"):
        raise NotOnBase("it owns backbone tensors (norm statistics or whole weights)")
    if manifest.plan.config.get("dora"):
        raise NotOnBase("DoRA rescales its layers' whole weights, which no branch carries")
    sites = adapter_sites(backbone)
    adapters = adapter_arrays(package, origin)
    config = manifest.plan.plan_config()
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    seen: set[str] = set()
    for target in manifest.plan.targets:
        site = sites.get(target.module)
        if site is None or target.module in seen:
            raise NotOnBase(f"no branch joins its layer {target.module}")
        seen.add(target.module)
        names = input_names(target.module)
        out = site.shape[0]
        if target.method == LORA:
            if site.groups != 1:
                raise NotOnBase(f"its layer {target.module} is a grouped conv with LoRA")
            a = np.asarray(adapters[f"{target.module}.lora_A"], dtype=np.float32)
            b = np.asarray(adapters[f"{target.module}.lora_B"], dtype=np.float32)
            rank = a.shape[0] if a.ndim else 0
            inner = int(np.prod(site.shape[1:]))
            if rank < 1 or a.size != rank * inner or b.size != out * rank:
                raise PetahError(f"{origin}: LoRA factors {a.shape} / {b.shape} do not fit {target.module} "
                                 f"of shape {site.shape}")
            b = b.reshape(out, rank) * np.float32(config.lora_scaling(rank))
            if site.norm_scale is not None:
                b = b * site.norm_scale[:, None]
            if site.kind == "conv":
                tensors[names["A"]] = (target.module, a.reshape((rank, *site.shape[1:])))
                tensors[names["B"]] = (target.module, np.ascontiguousarray(b.reshape(out, rank, 1, 1)))
            else:  # x @ Aᵀ @ B'ᵀ
                tensors[names["A"]] = (target.module, np.ascontiguousarray(a.reshape(rank, inner).T))
                tensors[names["B"]] = (target.module, np.ascontiguousarray(b.T))
        elif target.method == CHANNEL_SCALE:
            scale = 1.0 + np.asarray(adapters[f"{target.module}.scale_delta"], dtype=np.float32)
            if scale.shape != (out,):
                raise PetahError(f"{origin}: the channel scale of {target.module} has {scale.shape} values, "
                                 f"the layer {out} channels")
            shift = site.norm_shift if site.norm_shift is not None else np.zeros(out, np.float32)
            view = (1, out, 1, 1) if site.kind == "conv" else (out,)
            tensors[names["mul"]] = (target.module, scale.reshape(view))
            tensors[names["add"]] = (target.module, ((1.0 - scale) * shift).astype(np.float32).reshape(view))
        else:
            raise NotOnBase(f"its layer {target.module} has a {target.method} adapter")
    return tensors


@dataclass(frozen=True)
class Layout:
    """Which branches the shared base graph has: per module, its LoRA rank (0: none) and whether it
    has a channel scale. Tasks of a smaller layout feed theirs padded with zeros (exact)."""

    lora: tuple[tuple[str, int], ...] = ()
    scaled: tuple[str, ...] = ()

    @classmethod
    def of(cls, adapters: list[dict[str, tuple[str, np.ndarray]]]) -> Layout:
        lora: dict[str, int] = {}
        scaled: set[str] = set()
        for tensors in adapters:
            for name, (module, array) in tensors.items():
                if name.endswith("::A"):
                    lora[module] = max(lora.get(module, 0), array.shape[0] if array.ndim == 4 else array.shape[1])
                elif name.endswith("::mul"):
                    scaled.add(module)
        return cls(tuple(sorted(lora.items())), tuple(sorted(scaled)))

    def covers(self, other: Layout) -> bool:
        ranks = dict(self.lora)
        return all(ranks.get(m, 0) >= r for m, r in other.lora) and set(other.scaled) <= set(self.scaled)

    def union(self, other: Layout) -> Layout:
        ranks = dict(self.lora)
        for module, rank in other.lora:
            ranks[module] = max(ranks.get(module, 0), rank)
        return Layout(tuple(sorted(ranks.items())), tuple(sorted(set(self.scaled) | set(other.scaled))))


def layout_inputs(layout: Layout, sites: dict[str, Site]) -> dict[str, np.ndarray]:
    """Every branch input of the layout with what leaves its layer unchanged (zeros; ones for a
    scale): what a task that does not adapt a layer feeds it, shared by all tasks."""
    ranks = dict(layout.lora)
    values = {}
    for module in sorted(set(ranks) | set(layout.scaled)):
        site, names = sites[module], input_names(module)
        out, inner = site.shape[0], site.shape[1:]
        if module in ranks:
            rank = ranks[module]
            conv = site.kind == "conv"
            values[names["A"]] = np.zeros((rank, *inner) if conv else (int(np.prod(inner)), rank), np.float32)
            values[names["B"]] = np.zeros((out, rank, 1, 1) if conv else (rank, out), np.float32)
        if module in layout.scaled:
            view = (1, out, 1, 1) if site.kind == "conv" else (out,)
            values[names["mul"]] = np.ones(view, np.float32)
            values[names["add"]] = np.zeros(view, np.float32)
    return values


def padded(tensors: dict[str, tuple[str, np.ndarray]], defaults: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A task's feed for a layout (``defaults``: its ``layout_inputs``): its tensors, padded with zero
    rows / columns to the layout's ranks (the same product), and the defaults for every other input."""
    feed = dict(defaults)
    for name, (_, array) in tensors.items():
        want = defaults[name].shape
        if array.shape != want:
            array = np.pad(array, [(0, w - h) for h, w in zip(array.shape, want, strict=True)])
        feed[name] = np.ascontiguousarray(array)
    return feed


def base_graph(backbone: DeviceBackbone, layout: Layout) -> bytes:
    """The backbone graph with a branch per layout entry, the branch tensors its inputs (a task
    feeds every one: ``padded``), its outputs the backbone's (pooled features, feature levels)."""
    import onnx
    from onnx import helper, numpy_helper

    sites = adapter_sites(backbone)
    model = onnx.load_from_string(backbone.graph)
    graph = model.graph
    renamed: dict[str, str] = {}  # a site's output -> the original value, renamed before its branch
    branches: dict[int, list] = {}  # index of the node whose output a branch changes -> the branch's nodes
    producer = {out: i for i, node in enumerate(graph.node) for out in node.output}
    ranks = dict(layout.lora)
    for module in sorted(set(ranks) | set(layout.scaled)):
        site, names = sites[module], input_names(module)
        for source, value in site.places:
            renamed[value] = current = f"{value}::base"
            nodes = []
            if module in ranks:
                op, attrs = ("Conv", site.conv) if site.kind == "conv" else ("MatMul", {})
                nodes.append(helper.make_node(op, [source, names["A"]], [f"{value}::down"], **attrs))
                nodes.append(helper.make_node(op, [f"{value}::down", names["B"]], [f"{value}::up"]))
                target = f"{value}::lora" if module in layout.scaled else value
                nodes.append(helper.make_node("Add", [current, f"{value}::up"], [target]))
                current = target
            if module in layout.scaled:
                nodes.append(helper.make_node("Mul", [current, names["mul"]], [f"{value}::scaled"]))
                nodes.append(helper.make_node("Add", [f"{value}::scaled", names["add"]], [value]))
            branches.setdefault(producer[value], []).extend(nodes)
    ordered = []
    for i, node in enumerate(graph.node):
        node.output[:] = [renamed.get(name, name) for name in node.output]
        ordered.append(node)
        ordered.extend(branches.get(i, []))
    del graph.node[:]
    graph.node.extend(ordered)
    graph.input.extend(helper.make_tensor_value_info(name, FLOAT, list(array.shape))
                       for name, array in layout_inputs(layout, sites).items())
    graph.initializer.extend(numpy_helper.from_array(backbone.weights[key], name)
                             for key, name in backbone.index.items())
    return model.SerializeToString()


def head_graph(backbone: DeviceBackbone, package: TaskPackage, origin: str) -> tuple[bytes, list[str]]:
    """The task's head alone, reading the backbone's outputs it needs: (graph, the outputs it reads)."""
    from onnx import helper

    manifest = package.manifest
    kind = manifest.task.kind
    if kind not in HEAD_KINDS:
        raise EngineCannotRun(f"{origin} is a {kind} task; the device engine runs {', '.join(HEAD_KINDS)} tasks")
    if kind in GRAPH_HEAD_KINDS:
        reads, nodes, initializers, output = graph_head(manifest, package, backbone, origin)
    else:
        reads, nodes, initializers, output = linear_head(manifest, package.section("head"), backbone, origin)
    types = backbone.value_types()
    inputs = [helper.make_tensor_value_info(name, types.get(name) or FLOAT, None) for name in reads]
    import onnx

    model = onnx.load_from_string(backbone.graph)
    graph = helper.make_graph(nodes, "head", inputs, [output], initializers)
    made = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    return made.SerializeToString(), reads


__all__ = ["Layout", "NotOnBase", "Site", "adapter_sites", "base_adapters", "base_graph", "head_graph", "layout_inputs",
           "padded"]
