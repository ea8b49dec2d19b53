"""What runs the tasks inside the station. An engine is used from two sides: ``prepare`` may run on
any thread beside inference (it reads and verifies a package and builds what it can on its own);
``install`` / ``unload`` / ``run`` run only on the inference thread. ``run`` takes (3, H, W) uint8
numpy images.

``device`` (this module) needs no torch: each task's package merged into the shared device
backbone with numpy, one ONNX Runtime session per task. ``torch`` and ``onnx`` are the full
install's (``petah.runtime.engines``), loaded only when chosen."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petah.device import DeviceBackbone, task_graph
from petah.device import decode as answers
from petah.device.session import session_options
from petah.errors import PetahError
from petah.imaging import Preprocess
from petah.packages import Manifest, TrustPolicy, check_task_name, open_package

ENGINES = ("auto", "device", "onnx", "torch")


@dataclass
class TrunkSession:
    key: str
    session: object  # onnxruntime.InferenceSession: image -> the cut values
    cut: list[str]
    weight_bytes: int


@dataclass
class DeviceTask:
    name: str
    manifest: Manifest
    session: object  # onnxruntime.InferenceSession of the task's graph (from the image, or from its trunk's cut)
    preprocess: Preprocess
    changed_bytes: int
    own_weight_bytes: int
    trunk: TrunkSession | None = None

    def forward(self, batch, trunk_outputs: dict | None = None):
        """The task's output for a preprocessed batch; ``trunk_outputs``: its trunk's, when computed
        already for another task of the batch."""
        if self.trunk is None:
            return self.session.run(None, {"image": batch})[0]
        if trunk_outputs is None:
            trunk_outputs = self.trunk_outputs(batch)
        return self.session.run(None, trunk_outputs)[0]

    def trunk_outputs(self, batch) -> dict:
        return dict(zip(self.trunk.cut, self.trunk.session.run(self.trunk.cut, {"image": batch}), strict=True))


class DeviceEngine:
    """The device install's engine: the shared backbone's weights held once in numpy; per task a
    graph with its merged weights, opened by ONNX Runtime (which folds and packs them). A task that
    leaves a leading part of the backbone unchanged (budget plans give early stages rank 0) runs
    that part as a trunk shared with every task that leaves the same part alone: its weights held
    once, and run once per batch for all of them."""

    name = "device"

    def __init__(self, backbone: DeviceBackbone, threads: int, trust: TrustPolicy | None = None):
        self.backbone = backbone
        self.trust = trust
        self.options = session_options(threads)
        # no arena: a session's arena kept ~6 MB more per task on the demo for no speed at batch 1 (measured)
        self.options.enable_cpu_mem_arena = False
        self.tasks: dict[str, DeviceTask] = {}
        self.trunks: dict[str, TrunkSession] = {}  # changed only on the inference thread

    def _session(self, graph: bytes, origin: str):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(graph, self.options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's refusals name its internals, not the package's fault
            raise PetahError(f"{origin}: ONNX Runtime cannot open its graph ({type(exc).__name__})") from None

    def prepare(self, path: Path, name: str | None) -> DeviceTask:
        package, origin = open_package(path, self.backbone, self.trust)
        name = check_task_name(name or package.task_name, origin)
        origin = f"task {name}"
        graph = task_graph(self.backbone, package, origin)
        trunk = None
        if graph.trunk is not None:
            trunk = self.trunks.get(graph.trunk.key)  # a trunk being installed meanwhile is only opened twice
            if trunk is None:
                trunk = TrunkSession(graph.trunk.key, self._session(graph.trunk.graph, origin), graph.trunk.cut,
                                     graph.trunk.weight_bytes)
        task = DeviceTask(name, package.manifest, self._session(graph.graph, origin),
                          Preprocess.from_dict(package.manifest.preprocessing), graph.changed_bytes,
                          graph.own_weight_bytes, trunk)
        self._check_answers(task, origin)
        return task

    def _check_answers(self, task: DeviceTask, origin: str) -> None:
        """One blank image through the task, decoded: a graph whose output does not fit its manifest
        (class count, detection grid, …) is refused here, not on every request after it."""
        size = self.backbone.img_size
        try:
            outputs = task.forward(task.preprocess.array_batch([np.zeros((3, size, size), np.uint8)]))
            self.decode(task.manifest, outputs, [(size, size)], 1)
        except PetahError:
            raise
        except Exception as exc:  # whatever a graph that does not fit its manifest makes fail
            raise PetahError(f"{origin}: its graph's output does not fit its manifest ({type(exc).__name__})") from None

    def install(self, prepared: DeviceTask) -> Manifest:
        if prepared.trunk is not None:
            prepared.trunk = self.trunks.setdefault(prepared.trunk.key, prepared.trunk)
        self.tasks[prepared.name] = prepared
        self._drop_unused_trunks()
        return prepared.manifest

    def _drop_unused_trunks(self) -> None:
        used = {task.trunk.key for task in self.tasks.values() if task.trunk is not None}
        for key in set(self.trunks) - used:
            del self.trunks[key]

    def retire(self) -> None:
        """Nothing to do: a replaced session is freed with its last reference."""

    def unload(self, name: str) -> None:
        del self.tasks[name]
        self._drop_unused_trunks()

    def held(self, name: str) -> dict:
        """How a task is held in memory (``/v1/tasks``): merged into its own graph (``own_bytes``: the
        weights in it, its part of the backbone merged and its head), after a shared trunk where it
        leaves the backbone's leading part alone (``trunk_bytes``, held once for all its tasks)."""
        task = self.tasks.get(name)  # read beside the inference thread (GET /v1/tasks): a copy, no KeyError
        if task is None:
            return {"form": "removed", "engine": self.name}
        if task.trunk is None:
            return {"form": "merged", "engine": self.name, "own_bytes": task.own_weight_bytes}
        sharing = sum(1 for t in list(self.tasks.values()) if t.trunk is not None and t.trunk.key == task.trunk.key)
        return {"form": "shared trunk + merged", "engine": self.name, "own_bytes": task.own_weight_bytes,
                "trunk_bytes": task.trunk.weight_bytes, "trunk_tasks": sharing}

    def run(self, images: list, names: list[str], top_k: int) -> dict[str, list[dict]]:
        batches: dict[Preprocess, object] = {}  # tasks of one backbone share their preprocessing
        trunks: dict[tuple, dict] = {}  # each trunk runs once per batch for all its tasks
        results = {}
        for name in names:
            task = self.tasks[name]
            if task.preprocess not in batches:
                batches[task.preprocess] = task.preprocess.array_batch(images)
            batch = batches[task.preprocess]
            shared = None
            if task.trunk is not None:
                key = (task.trunk.key, task.preprocess)
                if key not in trunks:
                    trunks[key] = task.trunk_outputs(batch)
                shared = trunks[key]
            outputs = task.forward(batch, shared)
            results[name] = self.decode(task.manifest, outputs, [image.shape[-2:] for image in images], top_k)
        return results

    def decode(self, manifest: Manifest, outputs, sizes: list, top_k: int) -> list[dict]:
        kind, labels = manifest.task.kind, manifest.labels
        if kind == "segmentation":
            return answers.segmentation(outputs, labels, sizes)
        if kind == "detection":
            return answers.detection(outputs, labels, manifest.head, self.backbone.img_size, sizes)
        if kind == "anomaly":
            return answers.anomaly(outputs, labels, float(manifest.head.get("threshold", float("inf"))), sizes)
        return answers.classification(outputs, labels, top_k)


def engine_class(name: str):
    """The engine class for a name; the torch-side ones are imported only here, when chosen."""
    if name == "device":
        return DeviceEngine
    if name not in ("torch", "onnx"):
        raise PetahError(f"--engine must be one of {' | '.join(ENGINES)}, got {name!r}")
    try:
        from petah.runtime.engines import OnnxEngine, TorchEngine
    except ImportError as exc:  # the device install has no torch
        raise PetahError(f"--engine {name} needs the full install (pip install 'petah[build]'); "
                         f"this one lacks {exc.name}") from None
    return {"torch": TorchEngine, "onnx": OnnxEngine}[name]


def choose_engine(choice: str, backbone, tasks: int, budget_bytes: float) -> str:
    """``auto``: a device backbone gets the device engine. A torch backbone gets onnx (measured 4x
    the torch engine's speed on the demo tasks) while one merged graph per task (a backbone copy
    each) fits the budget, else torch (one shared backbone)."""
    if isinstance(backbone, DeviceBackbone):
        if choice not in ("auto", "device"):
            raise PetahError(f"--engine {choice} runs on a torch backbone (-b NAME / --weights); "
                             "a device backbone folder runs on --engine device")
        return "device"
    if choice == "device":
        raise PetahError("--engine device runs on a device backbone (petah export --device): pass its folder")
    if choice != "auto":
        return choice
    per_task = backbone.weights_bytes or sum(p.numel() * 4 for p in backbone.model.parameters())
    return "onnx" if max(tasks, 1) * per_task <= budget_bytes else "torch"


__all__ = ["ENGINES", "DeviceEngine", "choose_engine", "engine_class"]
