"""Training recipes side by side, judged by the adoption rule (docs/benchmarks.md).

    python benchmarks/recipe.py --grid bench --variants "r8:rank=8" "r8-lora+:rank=8,lora_plus=16" \
        [--tasks digits,faces] [--seeds 0,1,2] [--out F]

A variant is ``NAME:KEY=VALUE,...`` where a key is a field of ``PlanConfig`` (preset, rank, budget,
allocation, task_norm, ...), of ``TrainConfig`` (epochs, lr, head_lr, lora_plus, label_smoothing,
...) or ``adapter_dtype``; what it does not set is the grid's recipe. The first variant is the baseline every other is
judged against.

Grids (the demo backbone, one process, runs one after another):

* ``bench``: the method bench's classification tasks and splits (``petah.bench.methods._splits``:
  digits / textures / faces, at most 600 training images, scored on the built-in test set), its
  recipe: 3 epochs, batch 64, lr 3e-3, head lr 1e-2 (what every petah plan chose on val there);
* ``demo``: the demo's tasks with the demo's recipe (``petah.demo.DEMO_TASKS``: every training
  image, per-task epochs and batch, dice for segmentation, lr 2e-3 / 1e-2), scored on the
  built-in validation set (what the demo reports), dense tasks included.

The rule, per variant against the baseline: the mean over tasks (per seed, then over seeds) must
rise by more than 2 standard errors of the difference, no task may fall by more than 2 of its
standard errors, at no more stored bytes and at most 1.2x the training time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

BENCH_RECIPE = {"epochs": 3, "batch_size": 64, "lr": 3e-3, "head_lr": 1e-2}


def parse_variant(text: str) -> tuple[str, dict, dict, dict]:
    from petah.plans import PlanConfig
    from petah.train import TrainConfig

    name, _, body = text.partition(":")
    plan_fields = {f.name: f.type for f in dataclasses.fields(PlanConfig)}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    plan, train, adapt = {}, {}, {}
    for item in filter(None, (s.strip() for s in body.split(","))):
        key, _, raw = item.partition("=")
        text_keys = ("preset", "budget", "allocation", "task_norm", "lora_init", "adapter_dtype")
        value = raw if key in text_keys else json.loads(raw)
        if key == "adapter_dtype":
            adapt[key] = value
        elif key in plan_fields:
            plan[key] = value
        elif key in train_fields:
            train[key] = value
        else:
            raise SystemExit(f"variant {name}: {key!r} is neither a plan nor a training option")
    return name, plan, train, adapt


def tasks_of(grid: str):
    """(name, train, score_set, recipe, adapt keyword arguments) of every task of the grid."""
    from petah.data import Augment, load_builtin

    if grid == "bench":
        from petah.bench.methods import TASKS, _splits

        for task in TASKS:
            train, _, test = _splits(task, None, 600)
            yield task, train, test, dict(BENCH_RECIPE), {}
    else:
        from petah.demo import DEMO_PLANS, DEMO_TASKS

        for task in DEMO_TASKS:
            train, val = load_builtin(task.dataset)
            recipe = {"epochs": task.epochs, "batch_size": task.batch_size, **DEMO_PLANS["petah"]}
            yield task.name, train, val, recipe, {"augment": Augment(), "dice": task.dice}


def run(grid: str, variants: list[tuple[str, dict, dict, dict]], seeds: list[int], only: set[str] | None) -> list[dict]:
    from petah import api
    from petah.backbones import create_backbone, demo_backbone_path
    from petah.plans import PlanConfig
    from petah.tasks import kind_for_data
    from petah.train import TrainConfig

    backbone = create_backbone(weights=str(demo_backbone_path()))
    rows = []
    for task, train, scored, recipe, extra in tasks_of(grid):
        if only and task not in only:
            continue
        metric = kind_for_data(train).primary_metric
        for name, plan, training, adapt in variants:
            for seed in seeds:
                torch.manual_seed(seed)
                config = TrainConfig(**{**recipe, **training, "seed": seed, "progress": False})
                started = time.perf_counter()
                adapted = api.adapt(backbone, train, scored, plan=PlanConfig(**plan), config=config, task_name=task,
                                    **extra, **adapt)
                wall = time.perf_counter() - started
                with tempfile.TemporaryDirectory() as tmp:
                    stored = api.save_package(adapted, Path(tmp) / "t.petah").stat().st_size
                rows.append({"task": task, "variant": name, "seed": seed, "metric": metric,
                             "score": api.evaluate(backbone, adapted.package, scored)[metric],
                             "stored_bytes": stored, "backbone_bytes": backbone.weights_bytes,
                             "train_seconds": round(adapted.train.seconds, 2), "adapt_seconds": round(wall, 2)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def _se(values: list[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarize(rows: list[dict], names: list[str]) -> dict:
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})

    def cell(task, name):
        return [r for r in rows if r["task"] == task and r["variant"] == name]

    table = {name: {task: {"mean": round(statistics.fmean(r["score"] for r in cell(task, name)), 4),
                           "se": round(_se([r["score"] for r in cell(task, name)]), 4),
                           "stored_bytes": max(r["stored_bytes"] for r in cell(task, name)),
                           "train_seconds": round(statistics.fmean(r["train_seconds"] for r in cell(task, name)), 2)}
                     for task in tasks} for name in names}
    per_seed_mean = {name: [statistics.fmean(r["score"] for t in tasks for r in cell(t, name) if r["seed"] == s)
                            for s in seeds] for name in names}
    base = names[0]
    verdicts = {}
    for name in names[1:]:
        gain = statistics.fmean(per_seed_mean[name]) - statistics.fmean(per_seed_mean[base])
        se = math.hypot(_se(per_seed_mean[name]), _se(per_seed_mean[base]))
        falls = {t: round((table[name][t]["mean"] - table[base][t]["mean"])
                          / max(math.hypot(table[name][t]["se"], table[base][t]["se"]), 1e-9), 2) for t in tasks}
        bytes_ratio = max(table[name][t]["stored_bytes"] / table[base][t]["stored_bytes"] for t in tasks)
        time_ratio = (sum(table[name][t]["train_seconds"] for t in tasks)
                      / sum(table[base][t]["train_seconds"] for t in tasks))
        verdicts[name] = {
            "mean_gain": round(gain, 4), "gain_in_se": round(gain / se, 2) if se > 0 else None,
            "task_change_in_se": falls, "bytes_ratio": round(bytes_ratio, 3), "time_ratio": round(time_ratio, 2),
            "adopt": bool(se > 0 and gain > 2 * se and min(falls.values()) >= -2 and bytes_ratio <= 1.0
                          and time_ratio <= 1.2)}
    return {"table": table, "mean_over_tasks": {n: round(statistics.fmean(v), 4) for n, v in per_seed_mean.items()},
            "against": base, "verdicts": verdicts}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--grid", choices=("bench", "demo"), default="bench")
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--tasks", default=None, help="only these tasks of the grid (comma-separated)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    only = set(args.tasks.split(",")) if args.tasks else None
    rows = run(args.grid, variants, [int(s) for s in args.seeds.split(",")], only)
    report = {"grid": args.grid, "variants": args.variants, "summary": summarize(rows, [v[0] for v in variants]),
              "cpu": platform.processor() or platform.machine(),
              "cpu_flags": " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
                                    if f in Path("/proc/cpuinfo").read_text()),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "runs": rows}
    print(json.dumps(report["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
