"""Helpers for tests and benchmarks: packages made without training (public, so tests use no
private API)."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from petah.adapters import TaskAdapter
from petah.backbones import Backbone
from petah.packages import TaskPackage
from petah.plans import PlanConfig
from petah.runtime.attach import build_package
from petah.tasks import Classification


def synthetic_package(backbone: Backbone, name: str, plan: PlanConfig, classes: int = 10, seed: int = 0,
                      labels: list[str] | None = None) -> TaskPackage:
    """A classification package with random non-zero adapters (latency and format checks; it
    predicts nothing meaningful). fp32 adapters, so an attached package reproduces them exactly."""
    work = replace(backbone, model=copy.deepcopy(backbone.model))
    adapter = TaskAdapter(work, plan)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    head = Classification.build_head(backbone.num_features, classes)
    labels = labels or [str(i) for i in range(classes)]
    return build_package(backbone, adapter, head, task_name=name, labels=labels, adapter_dtype="float32")
