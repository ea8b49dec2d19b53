"""Many tasks on one resident backbone: load / reload / unload packages, switch, run, merge.

The backbone is loaded once. Each package adds its adapters to the same model under its own
adapter name (PEFT's named LoRA adapters, petah's ChannelScale), its head, and — when the plan
owns norm tensors — their values. Switching tasks is a pointer switch on the adapted layers
(plus copying task-owned norm tensors, if any); no backbone weight is copied or reloaded.
In merged mode the active task's adapters are folded into the weights (zero overhead per call)
and a switch costs an unmerge and a merge.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from petah.adapters import TaskAdapter, refresh_attention_caches, release, remove_adapter, shadow_copy, transplant
from petah.backbones import Backbone
from petah.data import Preprocess
from petah.errors import PetahError
from petah.packages import Manifest, TaskPackage, TrustPolicy, check_task_name, open_package
from petah.runtime.attach import attach_adapters, head_from_package, torch_section
from petah.tasks import task_kind

MODES = ("unmerged", "merged")


@dataclass
class RuntimeTask:
    name: str
    manifest: Manifest
    adapter: TaskAdapter
    head: nn.Module
    overrides: dict[str, torch.Tensor]
    first_adapted_stage: int  # the leading stages before it can be shared with other tasks
    model: nn.Module  # the task's model around the shared backbone module (no copy)

    @property
    def classes(self) -> list[str]:
        return self.manifest.labels

    @property
    def kind(self):
        return task_kind(self.manifest.task.kind)


@dataclass
class PreparedTask:
    """A package read, verified and given its head, not yet in the resident model (``Runtime.prepare``)."""
    name: str
    package: TaskPackage
    origin: str
    head: nn.Module
    first_adapted_stage: int
    kind: object  # the task kind (petah.tasks)
    staged: Staged | None = None  # its adapters already added to a shadow of the model


@dataclass
class Staged:
    shadow: nn.Module  # the model's structure with the task's adapters added, tensors shared with the model
    adapter: TaskAdapter
    generation: int  # the model's structure it was copied from (see Runtime._generation)


class Runtime:
    """One resident backbone serving any number of task packages."""

    def __init__(self, backbone: Backbone, mode: str = "unmerged", trust: TrustPolicy | None = None):
        """``trust``: who must have signed a package this runtime loads (``petah.packages.TrustPolicy``)."""
        self.trust = trust
        self.backbone = replace(backbone, model=copy.deepcopy(backbone.model).eval())
        self.preprocess = Preprocess(backbone.img_size, backbone.mean, backbone.std)
        self.tasks: dict[str, RuntimeTask] = {}
        self.active: str | None = None
        self._ids = itertools.count()
        self._layers: list[nn.Module] = []  # every adapted layer of the model, kept for fast switching
        self._retired: list[RuntimeTask] = []  # replaced versions whose adapters are still in the model
        self._replaced: list[dict] = []  # model structures a staged install replaced, released by retire()
        # Structure changes count twice (start, end): a shadow copied at an even value that is still
        # current when installed saw the model exactly as it is (a seqlock).
        self._generation = 0
        self.set_mode(mode)

    # --- packages ------------------------------------------------------------------------
    def load(self, package: TaskPackage | str | Path, name: str | None = None) -> RuntimeTask:
        """Add (or atomically replace) a task. On any failure the previous version keeps serving."""
        return self.install(self.prepare(package, name))

    def prepare(self, package: TaskPackage | str | Path, name: str | None = None, stage: bool = False
                ) -> PreparedTask:
        """Everything of a load that leaves the resident model alone: read and verify the package,
        check its backbone, build its head and, with ``stage``, add its adapters to a shadow copy
        of the model (``petah.adapters.shadow``). Safe beside a running ``forward`` (a server does
        it off its inference thread); ``install`` then only swaps the shadow in.

        Not staged (``install`` adds the adapters itself): merged mode, and packages that own
        tensors (loading them writes into tensors the model shares with the shadow)."""
        package, origin = open_package(package, self.backbone, self.trust)
        name = check_task_name(name or package.task_name, origin)
        head = head_from_package(package, origin)
        kind = task_kind(package.manifest.task.kind)
        prepared = PreparedTask(name, package, origin, head, self._first_adapted_stage(package.manifest), kind)
        generation = self._generation
        if stage and self.mode == "unmerged" and not package.manifest.plan.overrides and generation % 2 == 0:
            shadow = shadow_copy(self.backbone.model)
            adapter = attach_adapters(replace(self.backbone, model=shadow), package, origin,
                                      name=self._adapter_id(name))
            prepared.staged = Staged(shadow, adapter, generation)
        return prepared

    def _adapter_id(self, name: str) -> str:
        return f"{name}#{next(self._ids)}"

    def install(self, prepared: PreparedTask, retire: bool = True) -> RuntimeTask:
        """Add the prepared task's adapters to the resident model and make it serve (replacing a task
        of the same name only once the new one is complete; on failure the old one keeps serving).
        ``retire=False`` leaves the replaced version's adapters in the model, unused, until
        ``retire()``: a server does that in a later pause, so each pause is shorter."""
        name, package, origin = prepared.name, prepared.package, prepared.origin
        was_active = self.active
        self._deactivate()
        self._generation += 1
        staged = prepared.staged
        if staged is not None and staged.generation == self._generation - 1:
            self._replaced.append(transplant(self.backbone.model, staged.shadow))  # the install, as a batch sees it
            adapter = staged.adapter
            adapter.backbone = self.backbone  # its model is the live one now
            refresh_attention_caches(self.backbone.model)  # the shadow copied caches of its moment
        else:
            adapter_id = self._adapter_id(name)
            try:
                adapter = attach_adapters(self.backbone, package, origin, name=adapter_id)
                adapter.restore_overrides()  # task-owned norm values go in only while the task is active
            except Exception as exc:
                remove_adapter(self.backbone.model, adapter_id)  # roll back a half-done injection
                self._generation += 1
                if was_active is not None:
                    self.activate(was_active)
                if isinstance(exc, PetahError):
                    raise
                raise PetahError(f"{origin} cannot be loaded: {type(exc).__name__}: {exc}") from exc
        model = prepared.kind.build_model(self.backbone.model, prepared.head).eval()
        task = RuntimeTask(name, package.manifest, adapter, prepared.head, torch_section(package, "override"),
                           prepared.first_adapted_stage, model)
        old = self.tasks.get(name)
        self.tasks[name] = task  # the swap: from here on the new version serves
        if old is not None:
            self._retired.append(old)
        if retire:
            self.retire()
        self._refresh_layers(task.adapter)
        self._generation += 1
        if was_active is not None and was_active in self.tasks:
            self.activate(was_active)
        return task

    def retire(self) -> None:
        """Take the adapters of replaced versions out of the model; free replaced structures."""
        while self._replaced:
            release(self.backbone.model, self._replaced.pop())
        if not self._retired:
            return
        self._deactivate()  # removing restores shared tensors: no task's own values may be in them
        self._generation += 1
        while self._retired:
            old = self._retired.pop()
            old.adapter.remove()
            self._refresh_layers(old.adapter)
        self._generation += 1

    def _refresh_layers(self, adapter: TaskAdapter) -> None:
        self._layers = adapter.adapted_layers()

    def unload(self, name: str) -> None:
        task = self._task(name)
        if self.active == name:
            self._deactivate()
        self._generation += 1
        task.adapter.remove()
        del self.tasks[name]
        self._refresh_layers(task.adapter)
        self._generation += 1

    def _task(self, name: str) -> RuntimeTask:
        if name not in self.tasks:
            raise PetahError(f"no task {name!r} is loaded (loaded: {', '.join(self.tasks) or 'none'})")
        return self.tasks[name]

    # --- switching -----------------------------------------------------------------------
    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise PetahError(f"unknown runtime mode {mode!r}; choose {' or '.join(MODES)}")
        active = self.active
        self._deactivate()
        self._generation += 2  # a shadow staged for the other mode is not used
        self.mode = mode
        if active is not None:
            self.activate(active)

    def activate(self, name: str) -> None:
        task = self._task(name)
        if self.active == name:
            return
        self._deactivate()
        task.adapter.activate(self._layers)
        if task.overrides:
            task.adapter.apply_overrides(task.overrides)
        if self.mode == "merged":
            task.adapter.merge()
        self.active = name

    def _deactivate(self) -> None:
        if self.active is None:
            return
        task = self.tasks.get(self.active)
        if task is not None:
            if task.adapter.merged:
                task.adapter.unmerge()
            if task.overrides:
                task.adapter.restore_overrides()
        self.active = None

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, batch: torch.Tensor, task: str) -> torch.Tensor:
        """Raw task outputs (logits) for a preprocessed batch."""
        self.activate(task)
        return self.tasks[task].model(batch)

    # --- shared trunk ----------------------------------------------------------------------
    def _first_adapted_stage(self, manifest: Manifest) -> int:
        """Computed once at load: ``run`` asks for it on every call."""
        family, model = self.backbone.family, self.backbone.model
        if family is None or not hasattr(model, "stages"):
            return 0
        plan = manifest.plan
        stages = [family.stage_of(t.module) for t in plan.targets] + [family.stage_of(k) for k in plan.overrides]
        return min(stages, default=len(model.stages))

    def shared_stages(self, names: list[str]) -> int:
        """How many leading stages no task in ``names`` adapts: computed once per image for all."""
        model = self.backbone.model
        layout = ("stem", "stages", "norm", "forward_head")
        if self.backbone.family is None or not all(hasattr(model, a) for a in layout):
            return 0  # the trunk split needs the stem / stages / norm layout (EfficientFormer V1 / V2)
        if any(self._task(n).kind.kind != "classification" for n in names):
            return 0  # dense heads read several stages: they run the whole backbone per task
        return min(self._task(n).first_adapted_stage for n in names)

    @torch.no_grad()
    def forward_many(self, batch: torch.Tensor, names: list[str], share_trunk: bool = True) -> dict[str, torch.Tensor]:
        """Raw outputs of several tasks; the unadapted leading stages run once for all of them."""
        shared = self.shared_stages(names) if share_trunk and names else 0
        if shared == 0:
            return {name: self.forward(batch, name) for name in names}
        model = self.backbone.model
        self.activate(names[0])  # layers in the trunk hold no adapter of it: they run plain
        trunk = model.stem(batch)
        for stage in model.stages[:shared]:
            trunk = stage(trunk)
        outputs = {}
        for name in names:
            self.activate(name)
            x = trunk
            for stage in model.stages[shared:]:
                x = stage(x)
            outputs[name] = self.tasks[name].head(model.forward_head(model.norm(x)))
        return outputs

    @torch.no_grad()
    def run(self, images: list[torch.Tensor], tasks: list[str] | None = None, top_k: int = 3) -> dict[str, list[dict]]:
        """Per-task decoded predictions for RGB uint8 images; preprocessing (and trunk) done once."""
        names = list(tasks) if tasks is not None else list(self.tasks)
        outputs = self.forward_many(self.preprocess.batch(images), names)
        sizes = [tuple(image.shape[-2:]) for image in images]  # dense outputs go back to each image's size
        return {name: self.tasks[name].kind.decode(outputs[name], self.tasks[name].classes, top_k, sizes,
                                                   head=self.tasks[name].head, img_size=self.backbone.img_size)
                for name in names}
