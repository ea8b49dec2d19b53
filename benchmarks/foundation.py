"""Measurements behind the foundation's defaults (run by hand; prints one JSON object).

    python benchmarks/foundation.py [--quick]

1. task-owned norms: `--task-norm none | affine | stats` on the demo tasks (accuracy, bytes);
2. adapter storage dtype: fp16 vs fp32 packages (accuracy, bytes);
3. package / backbone ratio for several backbones and ranks (petah plan, 10 classes);
4. merge / unmerge errors of the petah plan per family.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

os.environ.setdefault("PETAH_NO_PROGRESS", "1")

from petah import api  # noqa: E402
from petah.adapters import TaskAdapter, refresh_attention_caches  # noqa: E402
from petah.backbones import create_backbone  # noqa: E402
from petah.data import LabeledImages, load_builtin  # noqa: E402
from petah.demo import DEMO_PLANS, DEMO_TASKS, demo_backbone_path  # noqa: E402
from petah.plans import PlanConfig  # noqa: E402
from petah.train import TrainConfig  # noqa: E402


def _adapt(backbone, task, plan: PlanConfig, dtype="float16", max_steps=None):
    train, val = load_builtin(task.dataset)
    torch.manual_seed(0)
    config = TrainConfig(epochs=task.epochs, batch_size=task.batch_size, max_steps=max_steps, **DEMO_PLANS["petah"])
    result = api.adapt(backbone, train, val, plan=plan, config=config, task_name=task.name, adapter_dtype=dtype)
    with tempfile.TemporaryDirectory() as tmp:
        size = api.save_package(result, Path(tmp) / "p.petah").stat().st_size
    return {"accuracy": result.metrics["accuracy"], "package_bytes": size,
            "train_seconds": round(result.train.seconds, 1)}


def task_norm_and_dtype(max_steps):
    backbone = create_backbone(weights=str(demo_backbone_path()))
    norms, dtypes = [], []
    for task in DEMO_TASKS:
        for norm in ("none", "affine", "stats"):
            norms.append({"task": task.name, "task_norm": norm,
                          **_adapt(backbone, task, PlanConfig(task_norm=norm), max_steps=max_steps)})
            print(norms[-1], file=sys.stderr)
        for dtype in ("float32", "float16"):
            dtypes.append({"task": task.name, "adapter_dtype": dtype,
                           **_adapt(backbone, task, PlanConfig(), dtype, max_steps)})
            print(dtypes[-1], file=sys.stderr)
    return norms, dtypes


def ratios():
    rows = []
    data = LabeledImages([torch.zeros(3, 8, 8, dtype=torch.uint8)] * 20, torch.arange(20) % 10,
                         [str(i) for i in range(10)], "blank")
    train, val = data.split(0.5)
    for name, size, rank in [("efficientformerv2_s0", 64, 4), ("efficientformerv2_s0", 64, 8),
                             ("efficientformerv2_s0", 224, 4), ("efficientformerv2_s0", 224, 8),
                             ("efficientformer_l1", 224, 4), ("efficientformer_l1", 224, 8)]:
        backbone = create_backbone(name, size)
        result = api.adapt(backbone, train, val, plan=PlanConfig(rank=rank), config=TrainConfig(max_steps=1,
                           batch_size=4))
        with tempfile.TemporaryDirectory() as tmp:
            info = api.inspect_package(api.save_package(result, Path(tmp) / "p.petah"))
        rows.append({"backbone": name, "img_size": size, "rank": rank, "package_bytes": info["package_bytes"],
                     "backbone_bytes": info["backbone_bytes"], "ratio": info["ratio"]})
        print(rows[-1], file=sys.stderr)
    return rows


def merge_errors():
    rows = []
    for name, size in [("efficientformer_l1", 224), ("efficientformerv2_s0", 64), ("mobilenetv3_small_050", 64),
                       ("resnet10t", 64), ("vit_tiny_patch16_224", 32)]:
        torch.manual_seed(0)
        backbone = create_backbone(name, size)
        original = {k: v.clone() for k, v in backbone.model.state_dict().items()}
        x = torch.randn(4, 3, size, size)
        with torch.no_grad():
            base = backbone.model(x)
            adapter = TaskAdapter(backbone, PlanConfig())
            for p in adapter.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.05)
            refresh_attention_caches(backbone.model)
            unmerged = backbone.model(x)
            adapter.merge()
            merged = backbone.model(x)
            adapter.unmerge()
        restored = adapter.backbone_weights()
        rows.append({
            "backbone": name,
            "merge_rel_error": float((merged - unmerged).norm() / (unmerged - base).norm()),
            "unmerge_max_abs_error": max(float((restored[k] - original[k]).abs().max()) for k in original),
        })
        print(rows[-1], file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="cap training at 5 steps (smoke run)")
    parser.add_argument("--only", choices=["norm", "ratio", "merge"], default=None)
    args = parser.parse_args()
    out = {}
    if args.only in (None, "merge"):
        out["merge"] = merge_errors()
    if args.only in (None, "ratio"):
        out["ratios"] = ratios()
    if args.only in (None, "norm"):
        out["task_norm"], out["adapter_dtype"] = task_norm_and_dtype(5 if args.quick else None)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
