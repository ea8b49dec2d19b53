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

from petah.device import DeviceBackbone, task_graph
from petah.device import decode as answers
from petah.device.session import session_options
from petah.errors import PetahError
from petah.imaging import Preprocess
from petah.packages import Manifest, TrustPolicy, check_task_name, open_package

ENGINES = ("auto", "device", "onnx", "torch")


@dataclass
class DeviceTask:
    name: str
    manifest: Manifest
    session: object  # onnxruntime.InferenceSession of the task's graph
    preprocess: Preprocess
    changed_bytes: int


class DeviceEngine:
    """The device install's engine: the shared backbone's weights held once in numpy; per task a
    graph with its merged weights, opened by ONNX Runtime (which folds and packs them)."""

    name = "device"

    def __init__(self, backbone: DeviceBackbone, threads: int, trust: TrustPolicy | None = None):
        self.backbone = backbone
        self.trust = trust
        self.options = session_options(threads)
        self.tasks: dict[str, DeviceTask] = {}

    def prepare(self, path: Path, name: str | None) -> DeviceTask:
        import onnxruntime as ort

        package, origin = open_package(path, self.backbone, self.trust)
        name = check_task_name(name or package.task_name, origin)
        graph = task_graph(self.backbone, package, f"task {name}")
        session = ort.InferenceSession(graph.graph, self.options, providers=["CPUExecutionProvider"])
        return DeviceTask(name, package.manifest, session, Preprocess.from_dict(package.manifest.preprocessing),
                          graph.changed_bytes)

    def install(self, prepared: DeviceTask) -> Manifest:
        self.tasks[prepared.name] = prepared
        return prepared.manifest

    def retire(self) -> None:
        """Nothing to do: a replaced session is freed with its last reference."""

    def unload(self, name: str) -> None:
        del self.tasks[name]

    def held(self, name: str) -> dict:
        """How a task is held in memory (``/v1/tasks``): merged into its own graph, the weights it
        changes in its own arrays beside the backbone's shared ones."""
        return {"form": "merged", "engine": self.name, "own_bytes": self.tasks[name].changed_bytes}

    def run(self, images: list, names: list[str], top_k: int) -> dict[str, list[dict]]:
        batches: dict[Preprocess, object] = {}  # tasks of one backbone share their preprocessing
        results = {}
        for name in names:
            task = self.tasks[name]
            if task.preprocess not in batches:
                batches[task.preprocess] = task.preprocess.array_batch(images)
            outputs = task.session.run(None, {"image": batches[task.preprocess]})[0]
            results[name] = self.decode(task.manifest, outputs, [image.shape[-2:] for image in images], top_k)
        return results

    def decode(self, manifest: Manifest, outputs, sizes: list, top_k: int) -> list[dict]:
        kind, labels = manifest.task.kind, manifest.labels
        if kind == "segmentation":
            return answers.segmentation(outputs, labels, sizes)
        if kind == "detection":
            return answers.detection(outputs, labels, manifest.head, self.backbone.img_size, sizes)
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
