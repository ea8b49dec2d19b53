"""The offline demo: the bundled backbone, adapted to several built-in tasks with two plans.

The bundled backbone was made by petah itself (``petah prepare``, see ``assets/README.md`` for
the exact command); preparing it here would not fit the demo's five minutes on 2 CPU cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from petah import api
from petah.backbones import create_backbone, demo_backbone_path
from petah.data import Augment, load_builtin
from petah.plans import PlanConfig
from petah.tasks import kind_for_data
from petah.tasks.anomaly import AnomalyConfig
from petah.train import TrainConfig
from petah.train.trainer import stderr


@dataclass(frozen=True)
class DemoTask:
    name: str
    dataset: str
    epochs: int
    batch_size: int = 64
    dice: bool = False  # segmentation: cross-entropy + soft dice (the defects are ~4 % of the pixels)
    plans: tuple[str, ...] = ("petah", "linear-probe")


DEMO_TASKS = (
    DemoTask("digits", "digits", epochs=4),
    DemoTask("textures", "textures", epochs=6),
    # dense tasks train longer per image: the petah plan only, to stay inside the demo's 5 minutes
    # (their linear-probe and full comparisons are in docs/tasks.md, from longer runs)
    DemoTask("defects", "defects", epochs=10, batch_size=32, dice=True, plans=("petah",)),  # segmentation
    DemoTask("digit-boxes", "digit-boxes", epochs=18, batch_size=32, plans=("petah",)),  # detection
)
# anomaly: good surfaces only, a memory bank fitted on the frozen backbone (no training run)
DEMO_ANOMALY_TASKS = (DemoTask("surfaces", "surface-anomalies", epochs=0, plans=("patchcore",)),)
QUICK_CORESET = 0.01  # --max-steps: the anomaly bank's quick look (the full demo keeps 10 %)
DEMO_PLANS = {
    "petah": dict(lr=2e-3, head_lr=1e-2),
    "linear-probe": dict(lr=1e-2, head_lr=1e-2),
}


def run_demo(output: str | Path, tasks=DEMO_TASKS, plans=DEMO_PLANS, backbone_path: str | Path | None = None,
             max_steps: int | None = None, anomaly_tasks=()) -> list[dict]:
    """Adapt every demo task with every plan (and fit every anomaly task), write the packages,
    return one row each."""
    output = Path(output)
    backbone = create_backbone(weights=str(backbone_path or demo_backbone_path()))
    rows = []
    for task in tasks:
        train, val = load_builtin(task.dataset)
        for plan, rates in plans.items():
            if plan not in task.plans:
                continue
            torch.manual_seed(0)
            config = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, max_steps=max_steps,
                                 progress=False, **rates)
            stderr.print(f"adapting {task.name} ({len(train)} images) with plan {plan} ...")
            # "petah": what `petah adapt` gives the task's kind by default (classification: a 3 % budget)
            chosen = None if plan == "petah" else PlanConfig(preset=plan)
            result = api.adapt(backbone, train, val, plan=chosen, config=config, task_name=task.name,
                               augment=Augment(), dice=task.dice)
            path = api.save_package(result, output / f"{task.name}-{plan}.petah")
            rows.append(_row(task, plan, result, path, backbone, train))
    for task in anomaly_tasks:
        train, val = load_builtin(task.dataset)
        stderr.print(f"fitting {task.name} ({len(train)} good images) ...")
        settings = AnomalyConfig(coreset_ratio=AnomalyConfig.coreset_ratio if max_steps is None else QUICK_CORESET)
        result = api.adapt(backbone, train, val, task_name=task.name, anomaly=settings)
        rows.append(_row(task, "patchcore", result, api.save_package(result, output / f"{task.name}-patchcore.petah"),
                         backbone, train))
    return rows


def _row(task: DemoTask, plan: str, result, path: Path, backbone, train) -> dict:
    kind = kind_for_data(train)
    return {
        "task": task.name,
        "kind": kind.kind,
        "plan": plan,
        "metric": kind.primary_metric,
        "score": result.metrics[kind.primary_metric],
        "accuracy": result.metrics["accuracy"],
        "package_bytes": path.stat().st_size,
        "backbone_bytes": backbone.weights_bytes,
        "train_seconds": round(result.train.seconds, 2),
        "package": str(path),
    }
