"""What runs the tasks inside the station. An engine is used from two sides: ``prepare`` may run on
any thread beside inference (it reads and verifies a package and builds what it can on its own);
``install`` / ``unload`` / ``run`` run only on the inference thread. ``run`` takes (3, H, W) uint8
numpy images.

``device`` (this module) needs no torch: each task's package merged into the shared device
backbone with numpy, one ONNX Runtime session per task. ``torch`` and ``onnx`` are the full
install's (``petah.runtime.engines``), loaded only when chosen."""

from __future__ import annotations

import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from petah.device import DeviceBackbone, task_graph
from petah.device import decode as answers
from petah.device.base import (
    Layout,
    NotOnBase,
    adapter_sites,
    base_adapters,
    base_graph,
    head_graph,
    layout_inputs,
    padded,
)
from petah.device.session import release_memory, session_options
from petah.device.task import deepest_read
from petah.errors import PetahError, PetahWarning
from petah.imaging import Preprocess
from petah.packages import Manifest, TaskPackage, TrustPolicy, check_task_name, open_package
from petah.serve.holding import Holding, Traffic, plan_merged

ENGINES = ("auto", "device", "onnx", "torch")


@dataclass
class TrunkSession:
    key: str
    session: object  # onnxruntime.InferenceSession: image -> the cut values
    cut: list[str]
    weight_bytes: int


@dataclass
class MergedForm:
    """A task merged into a graph of its own (fast; a backbone's worth of weights)."""

    session: object  # onnxruntime.InferenceSession of the task's graph (from the image, or from its trunk's cut)
    own_weight_bytes: int
    trunk: TrunkSession | None = None


@dataclass
class BaseForm:
    """A task held on the shared base: its branch tensors (fed to the base graph) and its head."""

    adapters: dict  # graph input name -> (module, float32 array)
    layout: Layout
    head: object  # a classification head's (weight, bias) in numpy, else an onnxruntime.InferenceSession
    reads: list[str]  # the base graph's outputs the head reads
    deepest: str | None  # the feature level its drift features average (None: the pooled features)
    weight_bytes: int  # adapters + head
    feed: dict | None = None  # its inputs at the engine's base layout (padded; set on the inference thread)
    feed_layout: Layout | None = None


@dataclass
class BaseSession:
    layout: Layout
    session: object  # onnxruntime.InferenceSession of the base graph with the layout's branches
    defaults: dict  # what a task that does not adapt a layer feeds it

    def feed(self, form: BaseForm) -> dict:
        if form.feed_layout != self.layout:
            form.feed, form.feed_layout = padded(form.adapters, self.defaults), self.layout
        return form.feed


@dataclass
class DeviceTask:
    name: str
    manifest: Manifest
    preprocess: Preprocess
    source: Path | TaskPackage  # its file, read again to merge it later (when its traffic earns a graph of its own)
    origin: str
    merged: MergedForm | None = None
    base: BaseForm | None = None
    pinned: str | None = None  # why it cannot be held on the base (then it is always merged)
    new_base: BaseSession | None = None  # a base graph built for it in ``prepare`` (installed with it)

    def forward(self, batch, base: BaseSession | None, trunk_outputs: dict | None = None) -> tuple:
        """The task's output and its drift features (``petah.device.task.feature_output``) for a
        preprocessed batch; ``trunk_outputs``: its trunk's, when computed already for another task."""
        if self.merged is None:
            reads = self.base.reads
            values = base.session.run(reads, {"image": batch, **base.feed(self.base)})
            if self.base.deepest is None:
                features = values[0]
            else:
                features = values[reads.index(self.base.deepest)].mean((2, 3))
            if isinstance(self.base.head, tuple):  # a linear head: a session's fixed cost (~2 MB) for one Gemm
                weight, bias = self.base.head
                return values[0] @ weight.T + bias, features
            return self.base.head.run(None, dict(zip(reads, values, strict=True)))[0], features
        if self.merged.trunk is None:
            outputs = self.merged.session.run(None, {"image": batch})
        else:
            if trunk_outputs is None:
                trunk_outputs = self.trunk_outputs(batch)
            outputs = self.merged.session.run(None, trunk_outputs)
        return outputs[0], outputs[1]

    def trunk_outputs(self, batch) -> dict:
        trunk = self.merged.trunk
        return dict(zip(trunk.cut, trunk.session.run(trunk.cut, {"image": batch}), strict=True))


REBALANCE_S = 1.0  # how often the inference thread looks at traffic (one sort of a few tasks)


class DeviceEngine:
    """The device install's engine: the shared backbone's weights held once in numpy. A task is
    held merged (its package merged into a graph of its own, which ONNX Runtime folds and packs:
    fastest) or on the shared base (one graph of the unmerged backbone with branches for every
    such task's adapters, fed per task: about its package in memory, slower). Without a budget
    every task is merged; with one (``memory_budget_bytes``) the busiest tasks are merged while
    they fit and the rest held on the base, re-decided by traffic as the station runs
    (``petah.serve.holding``); a merge for a task that earns it is built beside inference and
    swapped in on the inference thread. A merged task that leaves a leading part of the backbone
    unchanged (budget plans give early stages rank 0) runs that part as a trunk shared with every
    task that leaves the same part alone: its weights held once, and run once per batch."""

    name = "device"

    def __init__(self, backbone: DeviceBackbone, threads: int, trust: TrustPolicy | None = None,
                 memory_budget_bytes: float | None = None):
        self.backbone = backbone
        self.trust = trust
        self.budget = memory_budget_bytes
        self.options = session_options(threads)
        # no arena: a session's arena kept ~6 MB more per task on the demo for no speed at batch 1 (measured)
        self.options.enable_cpu_mem_arena = False
        self.tasks: dict[str, DeviceTask] = {}
        self.trunks: dict[str, TrunkSession] = {}  # changed only on the inference thread
        self.base: BaseSession | None = None  # while any task is held on it
        self.traffic = Traffic()
        self.rebalance_s = REBALANCE_S
        self.moves = {"merged": 0, "to base": 0}  # tasks moved by traffic or budget since start
        self.features: dict[str, np.ndarray] = {}  # per task, its last batch's drift features (inference thread)
        self.inputs: dict[Preprocess, np.ndarray] = {}  # the last batch as each preprocessing made it (drift reads it)
        self._next_look = 0.0
        self._builder: threading.Thread | None = None
        self._built: tuple | None = None  # (task, merged form, base session or None, tasks to move to the base)

    # --- building (any thread) ----------------------------------------------------------------
    def _session(self, graph: bytes, origin: str):
        import onnxruntime as ort

        try:
            return ort.InferenceSession(graph, self.options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ONNX Runtime's refusals name its internals, not the package's fault
            raise PetahError(f"{origin}: ONNX Runtime cannot open its graph ({type(exc).__name__})") from None

    def _merge(self, task: DeviceTask, package: TaskPackage) -> MergedForm:
        graph = task_graph(self.backbone, package, task.origin)
        trunk = None
        if graph.trunk is not None:
            trunk = self.trunks.get(graph.trunk.key)  # a trunk being installed meanwhile is only opened twice
            if trunk is None:
                trunk = TrunkSession(graph.trunk.key, self._session(graph.trunk.graph, task.origin), graph.trunk.cut,
                                     graph.trunk.weight_bytes)
        return MergedForm(self._session(graph.graph, task.origin), graph.own_weight_bytes, trunk)

    def _base_form(self, task: DeviceTask, package: TaskPackage) -> BaseForm | None:
        try:
            adapters = base_adapters(self.backbone, package, task.origin)
        except NotOnBase as exc:
            task.pinned = str(exc)
            return None
        graph, reads = head_graph(self.backbone, package, task.origin)  # checks the head whatever runs it
        tensors = package.section("head")
        if task.manifest.task.kind == "classification":
            head = (np.asarray(tensors["weight"], np.float32), np.asarray(tensors["bias"], np.float32))
            head_bytes = sum(int(a.nbytes) for a in head)
        else:
            head = self._session(graph, task.origin)
            head_bytes = sum(int(np.asarray(v).nbytes) for v in tensors.values())
        return BaseForm(adapters, Layout.of([adapters]), head, reads, deepest_read(self.backbone, reads),
                        sum(int(array.nbytes) for _, array in adapters.values()) + head_bytes)

    def _base_session(self, layout: Layout, origin: str) -> BaseSession:
        sites = adapter_sites(self.backbone)
        return BaseSession(layout, self._session(base_graph(self.backbone, layout), origin),
                           layout_inputs(layout, sites))

    def _base_covering(self, forms: list[BaseForm], origin: str) -> BaseSession | None:
        """A base graph for these tasks: the current one when it has their branches, else a new one
        with the union of them (None: the current one will do)."""
        layout = self.base.layout if self.base is not None else Layout()
        wanted = layout
        for form in forms:
            wanted = wanted.union(form.layout)
        if self.base is not None and self.base.layout.covers(wanted):
            return None
        return self._base_session(wanted, origin)

    def prepare(self, path: Path | TaskPackage, name: str | None) -> DeviceTask:
        package, origin = open_package(path, self.backbone, self.trust)
        name = check_task_name(name or package.task_name, origin)
        origin = f"task {name}"
        source = path if isinstance(path, TaskPackage) else Path(path)  # a package read already: kept as it is
        task = DeviceTask(name, package.manifest, Preprocess.from_dict(package.manifest.preprocessing), source, origin)
        if self.budget is not None:
            task.base = self._base_form(task, package)
        if task.base is None or self._merged_fits(task):
            task.merged = self._merge(task, package)
        else:
            task.new_base = self._base_covering([task.base], origin)
        self._check_answers(task, origin)
        return task

    def _merged_fits(self, task: DeviceTask) -> bool:
        """Whether a new task fits the budget merged beside what is held now, displacing none of them
        (traffic decides later)."""
        others = [self._holding(t) for t in list(self.tasks.values()) if t.name != task.name]
        mine = Holding(task.name, self.backbone.resident_bytes, task.base.weight_bytes)
        return task.name in plan_merged([*others, mine], self.budget, self.backbone.resident_bytes)

    def _check_answers(self, task: DeviceTask, origin: str) -> None:
        """One blank image through the task, decoded: a graph whose output does not fit its manifest
        (class count, detection grid, …) is refused here, not on every request after it."""
        size = self.backbone.img_size
        try:  # the form it is held in (the other has the same head; its branches' shapes are checked)
            batch = task.preprocess.array_batch([np.zeros((3, size, size), np.uint8)])
            self.decode(task.manifest, task.forward(batch, task.new_base or self.base)[0], [(size, size)], 1)
        except PetahError:
            raise
        except Exception as exc:  # whatever a graph that does not fit its manifest makes fail
            raise PetahError(f"{origin}: its graph's output does not fit its manifest ({type(exc).__name__})") from None

    # --- holding (inference thread) ------------------------------------------------------------
    def _holding(self, task: DeviceTask, traffic: dict | None = None) -> Holding:
        merged_bytes = task.merged.own_weight_bytes if task.merged is not None else self.backbone.resident_bytes
        base_bytes = task.base.weight_bytes if task.base is not None else None
        return Holding(task.name, merged_bytes, base_bytes,
                       (traffic or {}).get(task.name, 0.0), task.merged is not None)

    def _set_base(self, base: BaseSession | None) -> None:
        if base is not None and (self.base is None or base.layout.covers(self.base.layout)):
            self.base = base
        on_base = [t.base for t in self.tasks.values() if t.merged is None]
        if not on_base:
            self.base = None
        elif self.base is None or not all(self.base.layout.covers(f.layout) for f in on_base):
            self.base = self._base_covering(on_base, "the shared base") or self.base  # rare: two installs raced

    def install(self, prepared: DeviceTask) -> Manifest:
        if prepared.merged is not None and prepared.merged.trunk is not None:
            prepared.merged.trunk = self.trunks.setdefault(prepared.merged.trunk.key, prepared.merged.trunk)
        new_base, prepared.new_base = prepared.new_base, None
        self.tasks[prepared.name] = prepared
        self._set_base(new_base)
        self._drop_unused_trunks()
        if self.budget is not None:  # within the budget at once: a new task may push a merged one to the base
            holdings, wanted = self._plan()
            over = [h.name for h in holdings if h.merged_now and h.name not in wanted]
            if over:
                self._demote(over)
        return prepared.manifest

    def _drop_unused_trunks(self) -> None:
        used = {t.merged.trunk.key for t in self.tasks.values() if t.merged is not None and t.merged.trunk is not None}
        for key in set(self.trunks) - used:
            del self.trunks[key]

    def retire(self) -> None:
        """Nothing to do: a replaced session is freed with its last reference."""

    def unload(self, name: str) -> None:
        del self.tasks[name]
        self.features.pop(name, None)
        self.traffic.forget(name)
        self._set_base(None)
        self._drop_unused_trunks()

    def _plan(self) -> tuple[list[Holding], set[str]]:
        traffic = self.traffic.scores()
        holdings = [self._holding(t, traffic) for t in self.tasks.values()]
        return holdings, plan_merged(holdings, self.budget, self.backbone.resident_bytes)

    def _demote(self, names: list[str]) -> None:
        """Move merged tasks to the shared base now (their merged graphs are freed)."""
        forms = [self.tasks[name].base for name in names]
        for name in names:
            self.tasks[name].merged = None
        self._set_base(self._base_covering(forms, "the shared base"))
        self._drop_unused_trunks()
        self.moves["to base"] += len(names)
        release_memory()

    def _look_at_traffic(self) -> None:
        """Take in a finished merge; then, at most every ``rebalance_s``, start building the merge of
        the busiest task the budget has room for (one at a time, beside inference)."""
        if self._built is not None:
            task, merged, base, demote = self._built
            self._built = None
            if self.tasks.get(task.name) is task:
                if merged.trunk is not None:
                    merged.trunk = self.trunks.setdefault(merged.trunk.key, merged.trunk)
                task.merged = merged
                for name in demote:
                    other = self.tasks.get(name)
                    if other is not None and other.base is not None and other is not task:
                        other.merged = None
                self._set_base(base)
                self._drop_unused_trunks()
                self.moves["merged"] += 1
                self.moves["to base"] += len(demote)
                release_memory()  # the merge's working copies, freed on the builder's thread
        if self.budget is None or self._builder is not None or time.monotonic() < self._next_look:
            return
        self._next_look = time.monotonic() + self.rebalance_s
        holdings, wanted = self._plan()
        promote = [h for h in holdings if h.name in wanted and not h.merged_now]
        demote = [h.name for h in holdings if h.name not in wanted and h.merged_now]
        if not promote:
            if demote:  # over the budget (tasks grew): move them to the base at once
                self._demote(demote)
            return
        task = self.tasks[max(promote, key=lambda h: h.traffic).name]
        self._builder = threading.Thread(target=self._build, args=(task, demote), name="petah-merge", daemon=True)
        self._builder.start()

    def _build(self, task: DeviceTask, demote: list[str]) -> None:
        try:  # its file read and verified again (the state folder keeps it while it is installed)
            package, _ = open_package(task.source, self.backbone, self.trust)
            if package.manifest.content_sha256 != task.manifest.content_sha256:
                raise PetahError("its file changed since it was installed")
            merged = self._merge(task, package)
            forms = [self.tasks[n].base for n in demote if n in self.tasks and self.tasks[n].base is not None]
            base = self._base_covering(forms, task.origin) if forms else None
            self._built = (task, merged, base, demote)
        except Exception as exc:  # the task stays on the base; said once, never fatal to serving
            warnings.warn(f"{task.origin}: merging it failed, it stays on the shared base: {exc}", PetahWarning,
                          stacklevel=2)
        finally:
            self._builder = None

    def held(self, name: str) -> dict:
        """How a task is held in memory (``/v1/tasks``): merged into its own graph (``own_bytes``: the
        weights in it, its part of the backbone merged and its head), after a shared trunk where it
        leaves the backbone's leading part alone (``trunk_bytes``, held once for all its tasks), or on
        the shared base (``adapter_bytes``: its branches and head; ``base_bytes``: the shared graph's)."""
        task = self.tasks.get(name)  # read beside the inference thread (GET /v1/tasks): a copy, no KeyError
        if task is None:
            return {"form": "removed", "engine": self.name}
        merged, tasks = task.merged, list(self.tasks.values())
        extra = {"pinned": task.pinned} if task.pinned and self.budget is not None else {}
        if merged is None:
            return {"form": "shared base", "engine": self.name, "adapter_bytes": task.base.weight_bytes,
                    "base_bytes": self.backbone.resident_bytes, "base_tasks": sum(1 for t in tasks if t.merged is None)}
        if merged.trunk is None:
            return {"form": "merged", "engine": self.name, "own_bytes": merged.own_weight_bytes, **extra}
        sharing = sum(1 for t in tasks if t.merged is not None and t.merged.trunk is not None
                      and t.merged.trunk.key == merged.trunk.key)
        return {"form": "shared trunk + merged", "engine": self.name, "own_bytes": merged.own_weight_bytes,
                "trunk_bytes": merged.trunk.weight_bytes, "trunk_tasks": sharing, **extra}

    def memory(self) -> dict:
        """The weights the engine holds, by form, against its budget (``/v1/stats``)."""
        tasks = list(self.tasks.values())
        merged = sum(t.merged.own_weight_bytes for t in tasks if t.merged is not None)
        adapters = sum(t.base.weight_bytes for t in tasks if t.base is not None)
        base = self.backbone.resident_bytes if self.base is not None else 0
        trunks = sum(t.weight_bytes for t in list(self.trunks.values()))
        return {"budget_bytes": None if self.budget is None else int(self.budget),
                "held_bytes": merged + adapters + base + trunks, "backbone_bytes": self.backbone.resident_bytes,
                "merged_bytes": merged, "adapter_bytes": adapters, "base_bytes": base, "trunk_bytes": trunks,
                "merged_tasks": sum(1 for t in tasks if t.merged is not None),
                "base_tasks": sum(1 for t in tasks if t.merged is None), "moves": dict(self.moves)}

    def run(self, images: list, names: list[str], top_k: int) -> dict[str, list[dict]]:
        self._look_at_traffic()
        batches: dict[Preprocess, object] = {}  # tasks of one backbone share their preprocessing
        trunks: dict[tuple, dict] = {}  # each trunk runs once per batch for all its tasks
        results = {}
        for name in names:
            task = self.tasks[name]
            if task.preprocess not in batches:
                batches[task.preprocess] = task.preprocess.array_batch(images)
            batch = batches[task.preprocess]
            shared = None
            if task.merged is not None and task.merged.trunk is not None:
                key = (task.merged.trunk.key, task.preprocess)
                if key not in trunks:
                    trunks[key] = task.trunk_outputs(batch)
                shared = trunks[key]
            outputs, self.features[name] = task.forward(batch, self.base, shared)
            results[name] = self.decode(task.manifest, outputs, [image.shape[-2:] for image in images], top_k)
            self.traffic.add(name, len(images))
        self.inputs = batches
        return results

    def outputs(self, task: DeviceTask, batch):
        """A prepared or installed task's raw output for a preprocessed batch (the golden-set gate's)."""
        return task.forward(batch, task.new_base or self.base)[0]

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
