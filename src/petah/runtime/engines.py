"""The station's torch-side engines (full install only; ``petah.serve.engine`` loads them lazily):
the torch runtime (one backbone, adapters unmerged) and one torch-exported merged ONNX graph per
task. The interface is ``petah.serve.engine``'s: ``prepare`` beside inference, ``install`` /
``unload`` / ``run`` on the inference thread; ``run`` takes (3, H, W) uint8 numpy images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from petah.backbones import Backbone
from petah.data import Preprocess
from petah.device.session import session_options
from petah.packages import Manifest, TrustPolicy, check_task_name, open_package
from petah.runtime import PreparedTask, Runtime
from petah.tasks import task_kind


class TorchEngine:
    """One resident backbone with every task's adapters unmerged (petah's runtime): tasks switch by
    pointer and classification tasks share the unadapted leading stages of the trunk."""

    name = "torch"

    def __init__(self, backbone: Backbone, threads: int, trust: TrustPolicy | None = None,
                 memory_budget_bytes: float | None = None):
        """``memory_budget_bytes``: not used (one backbone, every task's adapters beside it)."""
        torch.set_num_threads(threads)  # deliberate: spinning intra-op threads slow every other process
        self.runtime = Runtime(backbone, trust=trust)

    @property
    def backbone(self) -> Backbone:
        """The runtime's own copy (the station keeps this one, so the weights are held once)."""
        return self.runtime.backbone

    def prepare(self, path: Path, name: str) -> PreparedTask:
        return self.runtime.prepare(path, name, stage=True)  # adapters added beside inference

    def install(self, prepared: PreparedTask) -> Manifest:
        return self.runtime.install(prepared, retire=False).manifest

    def retire(self) -> None:
        """Drop the replaced version's adapters (a separate, later pause)."""
        self.runtime.retire()

    def unload(self, name: str) -> None:
        self.runtime.unload(name)

    def held(self, name: str) -> dict:
        """How a task is held (``/v1/tasks``): its adapters beside the shared backbone, unmerged."""
        return {"form": "adapters", "engine": self.name}

    def run(self, images: list, names: list[str], top_k: int) -> dict[str, list[dict]]:
        return self.runtime.run([torch.from_numpy(image) for image in images], tasks=names, top_k=top_k)


@dataclass
class OnnxTask:
    name: str
    manifest: Manifest
    session: object  # onnxruntime.InferenceSession of the task's merged graph
    head: nn.Module  # detection decoding reads its strides / layout

    @property
    def kind(self):
        return task_kind(self.manifest.task.kind)


class OnnxEngine:
    """ONNX Runtime, one merged graph per task (adapters folded in, exported on install). Installing
    is done entirely beside inference (export + session), so a swap is one dict assignment; the
    price is a whole backbone copy per task and no shared trunk (see docs/deploy.md for the figures)."""

    name = "onnx"

    def __init__(self, backbone: Backbone, threads: int, trust: TrustPolicy | None = None,
                 memory_budget_bytes: float | None = None):
        """``memory_budget_bytes``: not used here (``--engine auto`` picks this engine while it fits)."""
        self.backbone = backbone
        self.trust = trust
        self.preprocess = Preprocess(backbone.img_size, backbone.mean, backbone.std)
        self.options = session_options(threads)
        self.tasks: dict[str, OnnxTask] = {}

    def prepare(self, path: Path, name: str | None) -> OnnxTask:
        import onnxruntime as ort

        from petah.runtime.onnx import merged_task_graph

        package, origin = open_package(path, self.backbone, self.trust)
        name = check_task_name(name or package.task_name, origin)
        graph, module, manifest = merged_task_graph(self.backbone, package, f"task {name}")
        session = ort.InferenceSession(graph, self.options, providers=["CPUExecutionProvider"])
        return OnnxTask(name, manifest, session, module.head)

    def install(self, prepared: OnnxTask) -> Manifest:
        self.tasks[prepared.name] = prepared
        return prepared.manifest

    def retire(self) -> None:
        """Nothing to do: a replaced session is freed with its last reference."""

    def unload(self, name: str) -> None:
        del self.tasks[name]

    def held(self, name: str) -> dict:
        """How a task is held (``/v1/tasks``): a whole merged graph of its own (a backbone copy)."""
        return {"form": "merged copy", "engine": self.name}

    def run(self, images: list, names: list[str], top_k: int) -> dict[str, list[dict]]:
        images = [torch.from_numpy(image) for image in images]
        batch = self.preprocess.batch(images).numpy()
        sizes = [tuple(image.shape[-2:]) for image in images]
        results = {}
        for name in names:
            task = self.tasks[name]
            outputs = torch.from_numpy(task.session.run(None, {"image": batch})[0])
            results[name] = task.kind.decode(outputs, task.manifest.labels, top_k, sizes, head=task.head,
                                             img_size=self.backbone.img_size)
        return results


__all__ = ["OnnxEngine", "TorchEngine"]
