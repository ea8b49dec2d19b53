"""What runs the tasks inside the station. An engine is used from two sides: ``prepare`` may run on
any thread beside inference (it reads and verifies a package and builds what it can on its own);
``install`` / ``unload`` / ``run`` run only on the inference thread."""

from __future__ import annotations

from pathlib import Path

import torch

from petah.backbones import Backbone
from petah.packages import Manifest
from petah.runtime import PreparedTask, Runtime


class TorchEngine:
    """One resident backbone with every task's adapters unmerged (petah's runtime): tasks switch by
    pointer and classification tasks share the unadapted leading stages of the trunk."""

    name = "torch"

    def __init__(self, backbone: Backbone, threads: int):
        torch.set_num_threads(threads)  # deliberate: spinning intra-op threads slow every other process
        self.runtime = Runtime(backbone)

    def prepare(self, path: Path, name: str) -> PreparedTask:
        return self.runtime.prepare(path, name)

    def install(self, prepared: PreparedTask) -> Manifest:
        return self.runtime.install(prepared).manifest

    def unload(self, name: str) -> None:
        self.runtime.unload(name)

    def has(self, name: str) -> bool:
        return name in self.runtime.tasks

    def run(self, images: list[torch.Tensor], names: list[str], top_k: int) -> dict[str, list[dict]]:
        return self.runtime.run(images, tasks=names, top_k=top_k)


__all__ = ["TorchEngine"]
