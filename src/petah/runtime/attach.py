"""Packages meet torch models: build a package from a trained adapter + head, and attach one to a
backbone (adapters, owned tensors, head). The build side and the torch runtime use it; reading,
verifying and checking a package against a backbone is ``petah.packages`` (no torch)."""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from petah.adapters import TaskAdapter
from petah.adapters.model import ADAPTER
from petah.backbones import Backbone, build_plain, fingerprint
from petah.backbones.tensors import to_numpy, to_torch
from petah.data import Preprocess
from petah.errors import PetahError
from petah.packages import (
    ADAPTER_DTYPES,
    BackboneRef,
    Manifest,
    PlanRecord,
    TaskInfo,
    TaskPackage,
    TrustPolicy,
    check_task_name,
    open_package,
)
from petah.packages.format import NORM_STATISTICS, statistics_dtype
from petah.packages.manifest import GRAPH_TENSOR
from petah.packages.quantized import LORA_FACTORS, QUANTIZED_DTYPES, SCALE_SUFFIX, adapter_arrays, quantize_factor
from petah.plans.base import MAGNITUDE
from petah.runtime.graphs import GRAPH_HEADS, head_graph
from petah.tasks import Classification, task_kind

DTYPES = {name: getattr(torch, name) for name in ADAPTER_DTYPES}  # "float16" -> torch.float16 …, "int8" -> torch.int8


def check_dtype(option: str, dtype: str) -> torch.dtype:
    """A float type named as the API and CLI name it ("float16" …); refused with a one-line error."""
    if dtype not in DTYPES:
        raise PetahError(f"{option} must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def now_utc() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def backbone_ref(backbone: Backbone) -> BackboneRef:
    return BackboneRef(backbone.name, backbone.img_size, backbone.fingerprint, int(backbone.weights_bytes or 0),
                       bool(backbone.pruned))


def pack_tensors(adapters: dict, overrides: dict, head: dict, adapter_dtype: str) -> dict:
    """A package's arrays: adapters in ``adapter_dtype`` (int8: LoRA factors quantized with a scale
    per rank term, channel scales fp16; DoRA magnitudes float32); owned norm statistics fp16 unless adapters are fp32
    (measured, docs/format.md); other overrides and the head stay as trained."""
    stats = DTYPES[statistics_dtype(adapter_dtype)]
    quantized = adapter_dtype in QUANTIZED_DTYPES
    out = {}
    for key, value in adapters.items():
        factor, value = key.rpartition(".")[2], value.detach()
        if quantized and factor in LORA_FACTORS:
            out[f"adapter/{key}"], out[f"adapter/{key}{SCALE_SUFFIX}"] = quantize_factor(to_numpy(value), factor)
        elif factor == MAGNITUDE:  # float32 always: it rescales whole weight rows (fp16 would move untrained ones)
            out[f"adapter/{key}"] = to_numpy(value.float())
        else:
            out[f"adapter/{key}"] = to_numpy(value.to(torch.float16 if quantized else DTYPES[adapter_dtype]))
    out.update({f"override/{k}": to_numpy(v.detach().to(stats) if k.endswith(NORM_STATISTICS) else v.detach())
                for k, v in overrides.items()})
    out.update({f"head/{k}": to_numpy(v.detach()) for k, v in head.items()})
    return out


def torch_section(package: TaskPackage, name: str) -> dict[str, torch.Tensor]:
    """One section of a package as torch tensors (sharing the arrays' memory); the adapter section
    as numbers to merge (int8 factors dequantized)."""
    arrays = adapter_arrays(package) if name == "adapter" else package.section(name)
    return {k: to_torch(v) for k, v in arrays.items()}


def build_package(backbone: Backbone, adapter: TaskAdapter, head: nn.Module, *, task_name: str, labels: list[str],
                  kind=Classification, adapter_dtype: str = "float16", **fields) -> TaskPackage:
    """A task package from a trained (or given) adapter and head; ``fields``: the manifest's
    optional fields (metrics, training, trainable_parameters, preprocessing, created_at)."""
    check_dtype("adapter_dtype", adapter_dtype)
    tensors = pack_tensors(adapter.adapter_state(), adapter.override_state(), head.state_dict(), adapter_dtype)
    manifest = Manifest(
        task=TaskInfo(check_task_name(task_name), kind.kind, tuple(labels)),
        backbone=backbone_ref(backbone),
        preprocessing=fields.pop("preprocessing", backbone.preprocessing()),
        plan=PlanRecord(adapter.config.to_dict(), tuple(adapter.targets), tuple(adapter.override_keys)),
        head={**kind.head_manifest(head), "tensors": sorted(head.state_dict())},
        adapter_dtype=adapter_dtype,
        created_at=fields.pop("created_at", now_utc()),
        **fields,
    )
    package = TaskPackage(manifest, tensors)
    if kind.kind in GRAPH_HEADS:
        add_head_graph(package, head)
    return package


def add_head_graph(package: TaskPackage, head: nn.Module | None = None) -> bool:
    """Give a dense task's package the graph of its head (format 3), so a device runs it without
    torch; ``head``: the package's own head when already built. False where it has one or needs none."""
    manifest = package.manifest
    if manifest.task.kind not in GRAPH_HEADS or manifest.head.get("graph"):
        return False
    head = head if head is not None else head_from_package(package, f"package {manifest.task.name}")
    graph, inputs = head_graph(manifest.task.kind, head, manifest.backbone.img_size)
    package.tensors[GRAPH_TENSOR] = np.frombuffer(graph, dtype=np.uint8).copy()
    manifest.head = {**manifest.head, "graph": "onnx", "graph_inputs": ",".join(inputs)}
    return True


def attach_package(backbone: Backbone, package: TaskPackage, origin: str,
                   name: str = ADAPTER) -> tuple[TaskAdapter, nn.Module]:
    """Add a package's adapters (as adapter ``name``) to ``backbone.model`` in place; build its head."""
    head = head_from_package(package, origin)
    return attach_adapters(backbone, package, origin, name), head


def head_from_package(package: TaskPackage, origin: str) -> nn.Module:
    """The package's head, built and loaded on its own: it touches no shared model, so a server can
    do it beside a running backbone."""
    manifest = package.manifest
    kind = task_kind(manifest.task.kind)
    head_tensors = torch_section(package, "head")
    check_head(kind, manifest.head, head_tensors, origin)  # before any layer is really allocated
    head = kind.head_from_manifest(manifest.head)
    head.load_state_dict(head_tensors)
    return head.eval()


def attach_adapters(backbone: Backbone, package: TaskPackage, origin: str, name: str = ADAPTER) -> TaskAdapter:
    """Add a package's adapters and task-owned tensors to ``backbone.model`` in place (as ``name``)."""
    try:
        plan = package.manifest.plan
        adapter = TaskAdapter(backbone, plan.plan_config(), targets=list(plan.targets), name=name)
    except (AttributeError, ValueError, TypeError, KeyError) as exc:
        raise PetahError(f"{origin} names layers this backbone lacks: {_first_line(exc)}") from exc
    try:
        adapter.load_state(torch_section(package, "adapter"), torch_section(package, "override"))
    except PetahError as exc:
        raise PetahError(f"{origin}: {exc}") from exc
    return adapter


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def check_head(kind, description: dict, tensors: dict[str, torch.Tensor], origin: str) -> None:
    """Build the described head on the meta device (no memory) and compare its tensor shapes with the
    stored ones: a description that asks for gigabytes, or does not fit its tensors, is refused first."""
    try:
        with torch.device("meta"):
            template = kind.head_from_manifest(description)
        want = {k: tuple(v.shape) for k, v in template.state_dict().items()}
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise PetahError(f"{origin}: the head description is invalid ({_first_line(exc)})") from None
    have = {k: tuple(v.shape) for k, v in tensors.items()}
    if want != have:
        wrong = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        key = wrong[0]
        raise PetahError(f"{origin}: head tensors do not fit the head it describes (head/{key}: "
                         f"{have.get(key, 'missing')} stored, {want.get(key, 'none')} described)")


@dataclass
class LoadedTask:
    manifest: Manifest
    model: nn.Module
    adapter: TaskAdapter
    preprocess: Preprocess

    @property
    def classes(self) -> list[str]:
        return self.manifest.labels

    @property
    def name(self) -> str:
        return self.manifest.task.name

    @property
    def kind(self):
        return task_kind(self.manifest.task.kind)


def load_task(backbone: Backbone, package: TaskPackage | str | Path, trust: TrustPolicy | None = None) -> LoadedTask:
    """Attach a package to a copy of ``backbone`` (refused unless it was trained on it, and unless
    ``trust`` accepts who signed it)."""
    package, origin = open_package(package, backbone, trust)
    manifest = package.manifest
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter, head = attach_package(work, package, origin)
    model = task_kind(manifest.task.kind).build_model(work.model, head).eval()
    return LoadedTask(manifest, model, adapter, Preprocess.from_dict(manifest.preprocessing))


def merged_backbone(backbone: Backbone, package: TaskPackage | str | Path) -> tuple[Backbone, LoadedTask]:
    """The task's adapters folded into a plain copy of the backbone: a task-specific backbone
    (its own fingerprint), e.g. to prune per task after adapting."""
    task = load_task(backbone, package)
    task.adapter.merge()
    plain = build_plain(backbone, task.adapter.backbone_weights())
    merged = replace(backbone, model=plain, fingerprint=fingerprint(plain),
                     source={**backbone.source, "merged_task": task.name})
    return merged, task
