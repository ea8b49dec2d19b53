"""A base ONNX model exported once + one ONNX Runtime adapter file per task.

The base graph carries every adapted layer as ``base(x) + B(A(x))`` (LoRA, scale folded into B)
or ``base(x) * s`` (ChannelScale), plus a head padded to the largest class count. Exactly those
tensors are made graph inputs with initializers — ONNX Runtime's overridable parameters — and
all other weights stay plain initializers, so constant folding and prepacking still apply to
the backbone. A task's adapter file (``onnxruntime.AdapterFormat``) holds its values; a device
activates it per call with ``RunOptions.add_active_adapter``. Padded head rows get a bias of
-1e9, so argmax / softmax over the padded logits are the task's own.

Tasks of one base may adapt different layers at different ranks (budget plans do): the base
holds every layer any task adapts, at the largest rank among them, and each task's tensors are
padded with zero rows / columns (zero A rows and B columns add exactly nothing; a layer the task
leaves alone gets zeros, or a scale of 1). A task that owns norm tensors cannot ride on a base
graph: its norms would have to be graph inputs, which keeps ONNX Runtime from folding them into
the convolutions of every task (export it merged).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from petah import __version__
from petah.backbones import Backbone
from petah.errors import PetahError
from petah.export.onnx import with_metadata, worst_error
from petah.files import atomic_write_bytes, check_writable, inside, staged_folder
from petah.packages import Manifest, TrustPolicy, read_trusted
from petah.plans import LORA, Target
from petah.runtime.attach import LoadedTask, load_task
from petah.runtime.onnx import INPUT, OUTPUT, to_onnx_bytes
from petah.tasks import ClassificationModel

PAD_BIAS = -1e9


class ConvLoraSlot(nn.Module):
    def __init__(self, base: nn.Conv2d, rank: int):
        super().__init__()
        self.base = base
        kh, kw = base.kernel_size
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_channels, kh, kw))
        self.lora_b = nn.Parameter(torch.zeros(base.out_channels, rank, 1, 1))

    def forward(self, x):
        low = F.conv2d(x, self.lora_a, None, self.base.stride, self.base.padding, self.base.dilation)
        return self.base(x) + F.conv2d(low, self.lora_b)


class LinearLoraSlot(nn.Module):
    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        # stored transposed so the exported MatMul uses the tensor as is (its name survives)
        self.lora_a = nn.Parameter(torch.zeros(base.in_features, rank))
        self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a) @ self.lora_b


class ScaleSlot(nn.Module):
    def __init__(self, base: nn.Conv2d):
        super().__init__()
        self.base = base
        # (C, 1, 1) broadcasts as is: a reshape in the graph would be folded into a renamed constant
        self.scale = nn.Parameter(torch.ones(base.out_channels, 1, 1))

    def forward(self, x):
        return self.base(x) * self.scale


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def union_targets(manifests: list[Manifest]) -> list[Target]:
    """Every layer any of the tasks adapts, at the largest rank among them: the base graph's slots."""
    largest: dict[str, Target] = {}
    for manifest in manifests:
        for target in manifest.plan.targets:
            seen = largest.get(target.module)
            if seen is None or target.rank > seen.rank:
                largest[target.module] = target
    return sorted(largest.values(), key=lambda t: t.module)


def _padded(tensor: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``tensor`` grown to ``size`` along ``dim`` with zeros (a LoRA rank padded: exactly the same update)."""
    shape = list(tensor.shape)
    shape[dim] = size - shape[dim]
    return torch.cat([tensor, tensor.new_zeros(shape)], dim)


def task_values(task: LoadedTask, classes: int, slots: list[Target],
                neutral: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A task's values for every overridable tensor of the base graph (names as in the graph):
    its own adapters padded to each slot's rank, the ``neutral`` values where it adapts nothing."""
    values: dict[str, np.ndarray] = {}
    own = {t.module for t in task.manifest.plan.targets}
    for slot in slots:
        key = f"backbone.{slot.module}"
        if slot.module not in own:
            continue  # it takes the neutral value, below
        layer = task.model.backbone.get_submodule(slot.module)
        if slot.method == LORA:
            name = task.adapter.name
            a, b = layer.lora_A[name].weight.detach(), layer.lora_B[name].weight.detach()
            a, b = _padded(a, 0, slot.rank), _padded(b * layer.scaling[name], 1, slot.rank)
            if isinstance(layer.get_base_layer(), nn.Linear):
                a, b = a.t(), b.t()
            values[f"{key}.lora_a"], values[f"{key}.lora_b"] = a.numpy(), b.numpy()
        else:
            values[f"{key}.scale"] = (1.0 + layer.deltas[task.adapter.name].detach()).view(-1, 1, 1).numpy()
    values = {**{k: v for k, v in neutral.items() if not k.startswith("head.")}, **values}
    head = task.model.head
    weight = torch.zeros(classes, head.in_features)
    bias = torch.full((classes,), PAD_BIAS)
    weight[: head.out_features] = head.weight.detach()
    bias[: head.out_features] = head.bias.detach()
    values["head.weight"], values["head.bias"] = weight.numpy(), bias.numpy()
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in values.items()}


def base_module(backbone: Backbone, slots: list[Target], classes: int) -> nn.Module:
    model = copy.deepcopy(backbone.model).eval()
    for target in slots:
        base = model.get_submodule(target.module)
        if target.method == LORA:
            slot = ConvLoraSlot(base, target.rank) if isinstance(base, nn.Conv2d) else LinearLoraSlot(base, target.rank)
        else:
            slot = ScaleSlot(base)
        _set(model, target.module, slot)
    head = nn.Linear(backbone.num_features, classes)
    template = ClassificationModel(model, head).eval().requires_grad_(False)
    # Distinct values while exporting: the exporter merges identical initializers (all-zero
    # adapters would collapse into one tensor). make_overridable writes the neutral values.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in template.named_parameters():
            if _overridable(name):
                param.copy_(torch.randn(param.shape, generator=gen))
    return template


def _overridable(name: str) -> bool:
    return name.endswith((".lora_a", ".lora_b", ".scale")) or name.startswith("head.")


def neutral_values(template: nn.Module) -> dict[str, np.ndarray]:
    """What the base graph holds when no adapter is active: the plain backbone, a padded head."""
    out = {}
    for name, param in template.named_parameters():
        if not _overridable(name):
            continue
        value = torch.ones_like(param) if name.endswith(".scale") else torch.zeros_like(param)
        if name == "head.bias":
            value.fill_(PAD_BIAS)
        out[name] = value.numpy()
    return out


def make_overridable(onnx_bytes: bytes, values: dict[str, np.ndarray]) -> bytes:
    """List exactly these initializers as graph inputs (ONNX Runtime lets adapters override
    them) and give them ``values``."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load_from_string(onnx_bytes)
    initializers = {init.name: init for init in model.graph.initializer}
    missing = [n for n in values if n not in initializers]
    if missing:
        raise PetahError(f"the exported graph renamed adapter tensors (e.g. {missing[0]}); "
                         "cannot make them overridable")
    for name, value in values.items():
        init = initializers[name]
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value, dtype=np.float32), name))
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, init.data_type, list(init.dims)))
    return model.SerializeToString()


@dataclass
class AdapterExport:
    base_path: Path
    base_bytes: int
    tasks: list[dict]

    def to_dict(self) -> dict:
        return {"base": str(self.base_path), "base_bytes": self.base_bytes, "tasks": self.tasks}


def export_base_and_adapters(backbone: Backbone, packages: list, output: str | Path,
                             real_inputs: torch.Tensor | None = None,
                             int8_calibration: list[np.ndarray] | None = None,
                             trust: TrustPolicy | None = None) -> AdapterExport:
    """Write ``base.onnx`` + ``<task>.onnx_adapter`` (+ ``<task>.json`` labels) and check parity.
    With ``int8_calibration`` (preprocessed image batches) the base graph is int8 (as
    ``petah.export.int8`` quantizes, calibrated with neutral adapters) while every node that reads
    an adapter tensor stays float, so the float adapter files switch tasks as before. ``trust``:
    who must have signed the packages (all are checked before anything is written)."""
    import onnxruntime as ort

    output = Path(output)
    check_writable(output / "base.onnx")
    loaded = [(p, read_trusted(p, trust)[0]) for p in packages]
    if not loaded:
        raise PetahError("no packages to export")
    first = loaded[0][1].manifest
    for path, package in loaded:
        manifest = package.manifest
        if manifest.task.kind != "classification":
            raise PetahError(f"{path}: a {manifest.task.kind} task; the shared base graph holds classification heads "
                             "— export it merged")
        if manifest.plan.config.get("dora"):
            raise PetahError(f"{path}: DoRA rescales each adapted layer's whole weight, which an adapter branch of a "
                             "shared base graph cannot do — export it merged")
        if manifest.plan.overrides:
            raise PetahError(f"{path}: its plan owns norm / bias tensors, which a shared base graph cannot switch; "
                             "export it merged")
    task_names = [p.task_name for _, p in loaded]
    if len({n.casefold() for n in task_names}) != len(task_names):  # a.onnx_adapter and A.onnx_adapter collide on macOS
        raise PetahError(f"two packages share a task name ({', '.join(task_names)}); "
                         "each task gets its own adapter file")
    classes = max(len(p.manifest.labels) for _, p in loaded)
    slots = union_targets([p.manifest for _, p in loaded])
    template = base_module(backbone, slots, classes)
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, backbone.img_size, backbone.img_size, generator=gen)
    neutral = neutral_values(template)
    names = sorted(neutral)
    onnx_bytes = to_onnx_bytes(template, example, f"the base graph of {backbone.name}")
    onnx_bytes = make_overridable(onnx_bytes, neutral)
    int8 = {}
    if int8_calibration is not None:
        from petah.export.int8 import float_op_types, quantizable_nodes, quantize

        adapter_nodes = nodes_reading(onnx_bytes, set(names))
        int8 = {"petah.int8": {"mode": "always", "quantized": True, "adapter_nodes_float": len(adapter_nodes),
                               "quantized_nodes": len(set(quantizable_nodes(onnx_bytes)) - set(adapter_nodes)),
                               "float_op_types": float_op_types(onnx_bytes),
                               "calibration_images": sum(len(b) for b in int8_calibration)}}
        onnx_bytes = quantize(onnx_bytes, int8_calibration, tuple(adapter_nodes))
    onnx_bytes = with_metadata(onnx_bytes, {**int8,
        "petah.format": "petah-onnx-base/1",
        "petah.version": __version__,
        "petah.backbone": backbone.identity(),
        "petah.preprocessing": first.preprocessing,
        "petah.adapter_tensors": names,
        "petah.padded_classes": classes,
    })
    options = ort.SessionOptions()
    options.log_severity_level = 3  # ORT warns about every overridable initializer: that is the design
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    inputs = [torch.randn(b, 3, backbone.img_size, backbone.img_size, generator=gen) for b in (1, 3)]
    if real_inputs is not None:
        inputs.append(real_inputs)
    rows = []
    with staged_folder(output) as stage:  # all files or none: a failed task leaves no base.onnx behind
        atomic_write_bytes(stage / "base.onnx", onnx_bytes)
        for _, package in loaded:
            name = package.task_name
            task = load_task(backbone, package)
            adapter = ort.AdapterFormat()
            adapter.set_adapter_version(1)
            adapter.set_model_version(1)
            # kept alive: an OrtValue only borrows the numpy memory
            values = task_values(task, classes, slots, neutral)
            adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in values.items()})
            staged = inside(stage, f"{name}.onnx_adapter")  # task names are untrusted: never outside the folder
            adapter.export_adapter(str(staged))
            labels = package.manifest.labels
            info = {"task": name, "labels": labels, "adapter": staged.name}
            atomic_write_bytes(inside(stage, f"{name}.json"), json.dumps(info).encode())
            error = adapter_parity(session, staged, task.model, inputs, len(labels))
            size = staged.stat().st_size
            rows.append({"task": name, "adapter": str(output / staged.name), "adapter_bytes": size,
                         "percent_of_base": round(100 * size / len(onnx_bytes), 3), "max_abs_error": error})
    base_path = output / "base.onnx"
    return AdapterExport(base_path, len(onnx_bytes), rows)


def nodes_reading(onnx_bytes: bytes, tensors: set[str]) -> list[str]:
    """The graph nodes that take one of ``tensors`` as an input (the adapter nodes)."""
    import onnx

    return [n.name for n in onnx.load_from_string(onnx_bytes).graph.node if tensors.intersection(n.input)]


def adapter_parity(session, adapter_path: Path, reference: nn.Module,
                   inputs: list[torch.Tensor], classes: int) -> float:
    import onnxruntime as ort

    lora = ort.LoraAdapter()
    lora.Load(str(adapter_path))
    options = ort.RunOptions()
    options.add_active_adapter(lora)
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            got = session.run([OUTPUT], {INPUT: x.numpy()}, options)[0][:, :classes]
            worst = worst_error(worst, got, reference(x).numpy())
    return worst
