"""`petah bench prune`: what pruning the shared backbone buys (latency, size) and costs (accuracy).

For each ratio the backbone is pruned once for all the demo tasks (Taylor importance on their
images together, then a short feature distillation), and every demo task is adapted on it with
the demo's own recipe. Latency is ONNX Runtime on the CPU at the backbone's working input size:
all ratios' sessions are timed interleaved in one run on the same input (median of repeats).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from petah import api
from petah.backbones import Backbone, create_backbone, save_backbone
from petah.bench.latency import interleaved_medians, ort_session
from petah.data import load_builtin
from petah.demo import DEMO_PLANS, DEMO_TASKS, demo_backbone_path, run_demo
from petah.prune import PruneConfig
from petah.runtime.onnx import INPUT, to_onnx_bytes

PLOT = "prune-accuracy-latency.png"


def _pruned_backbones(backbone: Backbone, ratios: list[float], config: PruneConfig, datasets: list,
                      folder: Path) -> list[dict]:
    """Prune at every ratio; ratio 0 is the original backbone. Each is saved (its bytes are reported)."""
    rows = []
    for ratio in ratios:
        start = time.perf_counter()
        if ratio == 0:
            pruned, report = backbone, {}
            path = folder / "ratio-0.safetensors"
            save_backbone(backbone, path)
        else:
            pruned, report = api.prune_backbone(backbone, config=replace(config, ratio=ratio), datasets=datasets)
            path = api.save_pruned(pruned, report, folder / f"ratio-{ratio}.safetensors", command="petah bench prune")
        rows.append({
            "ratio": ratio, "path": path, "backbone": pruned,
            **api.backbone_cost(pruned.model, pruned.img_size),
            "backbone_bytes": path.stat().st_size,
            "heads_removed": sum(report.get("heads_removed", {}).values()),
            "recovery": report.get("recovery", {}),
            "prune_seconds": round(time.perf_counter() - start, 1),
        })
    return rows


def _onnx_latencies(rows: list[dict], repeats: int) -> None:
    """Median ms per image of each row's backbone in ONNX Runtime, all interleaved on one input."""
    size = rows[0]["backbone"].img_size
    x = torch.randn(1, 3, size, size)
    feed = {INPUT: x.numpy()}
    sessions = {row["ratio"]: ort_session(to_onnx_bytes(row["backbone"].model, x, f"ratio {row['ratio']}"))
                for row in rows}
    medians = interleaved_medians({r: (lambda s=s: s.run(None, feed)) for r, s in sessions.items()}, repeats)
    base = medians[rows[0]["ratio"]]
    for row in rows:
        row["ort_ms"] = round(1e3 * medians[row["ratio"]], 3)
        row["speedup"] = round(base / medians[row["ratio"]], 3)


def _adapt_tasks(rows: list[dict], tasks, max_steps: int | None, folder: Path) -> None:
    """Adapt every demo task (petah plan, the demo's recipe) on each row's backbone."""
    base_mean = None
    for row in rows:
        results = run_demo(folder / f"tasks-{row['ratio']}", tasks, {"petah": DEMO_PLANS["petah"]},
                           row["path"], max_steps)
        row["tasks"] = {r["task"]: {"metric": r["metric"], "score": r["score"], "package_bytes": r["package_bytes"]}
                        for r in results}
        row["mean_score"] = round(sum(r["score"] for r in results) / len(results), 4)
        base_mean = row["mean_score"] if base_mean is None else base_mean
        row["loss_points"] = round(100 * (base_mean - row["mean_score"]), 2)


def _stored_bytes(row: dict) -> int:
    return row["backbone_bytes"] + sum(t["package_bytes"] for t in row["tasks"].values())


def _adapt_merge_prune(backbone: Backbone, tasks, ratio: float, config: PruneConfig, packages: Path,
                       max_steps: int | None, folder: Path) -> dict:
    """The other order: each task's adapters (trained on the unpruned backbone) merged into its own
    copy, pruned on that task's images alone (distilling from the merged copy), then adapted again
    on it, since pruning changes the features the head sees. One backbone per task."""
    scores, stored = {}, 0
    for task in tasks:
        merged, _ = api.merged_backbone(backbone, packages / f"{task.name}-petah.petah")
        pruned, report = api.prune_backbone(merged, config=replace(config, ratio=ratio),
                                            datasets=[load_builtin(task.dataset)[0]])
        path = api.save_pruned(pruned, report, folder / f"{task.name}-{ratio}.safetensors", command="petah bench prune")
        row = run_demo(folder / f"{task.name}-{ratio}", (task,), {"petah": DEMO_PLANS["petah"]}, path, max_steps)[0]
        scores[task.name] = row["score"]
        stored += path.stat().st_size + row["package_bytes"]
    return {"ratio": ratio, "tasks": scores, "mean_score": round(sum(scores.values()) / len(scores), 4),
            "stored_bytes": stored}


def plot(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    xs = [r["ort_ms"] for r in rows]
    for task in rows[0]["tasks"]:  # each task faintly, the mean (the target's measure) bold
        ax.scatter(xs, [r["tasks"][task]["score"] for r in rows], s=18, alpha=0.5,
                   label=f"{task} ({rows[0]['tasks'][task]['metric']})")
    ax.scatter(xs, [r["mean_score"] for r in rows], s=60, color="black", marker="D", label="mean")
    for r in rows:
        ax.annotate(f"{r['ratio']}", (r["ort_ms"], r["mean_score"]), textcoords="offset points", xytext=(5, 4))
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("ONNX Runtime CPU latency (ms / image)")
    ax.set_ylabel("score after adaptation")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _public(rows: list[dict]) -> list[dict]:
    return [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.items()
             if k not in ("backbone", "path")} for r in rows]


def run_prune_bench(out_dir: str | Path, ratios=(0.0, 0.25, 0.5), backbone_path: str | Path | None = None,
                    tasks=DEMO_TASKS, config: PruneConfig | None = None, repeats: int = 50,
                    max_steps: int | None = None, structural_models: tuple[str, ...] = ("efficientformer_l1",)) -> dict:
    """The whole table: the demo backbone at each ratio, then structure/latency-only models."""
    ratios = sorted({0.0, *[float(r) for r in ratios]})
    for r in ratios:
        PruneConfig(ratio=r)  # the same range check as the command
    config = config or PruneConfig(recover_epochs=3)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    structural = {}  # first: they take seconds, the demo tasks minutes
    for name in structural_models:  # no offline weights or data at their size: structure and latency only
        with tempfile.TemporaryDirectory() as tmp:
            model_rows = _pruned_backbones(create_backbone(name), ratios,
                                           PruneConfig(importance="magnitude"), [], Path(tmp))
            _onnx_latencies(model_rows, max(5, repeats // 5))
        structural[name] = _public(model_rows)
    backbone = create_backbone(weights=str(backbone_path or demo_backbone_path()))
    datasets = [load_builtin(t.dataset)[0] for t in tasks]
    with tempfile.TemporaryDirectory() as tmp:
        rows = _pruned_backbones(backbone, ratios, config, datasets, Path(tmp))
        _onnx_latencies(rows, repeats)
        _adapt_tasks(rows, tasks, max_steps, Path(tmp))
        shared = rows[-1]
        orders = {
            "prune_then_adapt": {"ratio": shared["ratio"], "tasks": {k: v["score"] for k, v in shared["tasks"].items()},
                                 "mean_score": shared["mean_score"], "stored_bytes": _stored_bytes(shared)},
            "adapt_merge_prune": _adapt_merge_prune(backbone, tasks, shared["ratio"], config, Path(tmp) / "tasks-0.0",
                                                    max_steps, Path(tmp)),
        }
    title = f"{backbone.name}@{backbone.img_size}px pruned (ratio at the mean), demo tasks adapted"
    result = {
        "backbone": backbone.describe(), "img_size": backbone.img_size, "threads": torch.get_num_threads(),
        "config": config.to_dict(), "tasks": [t.name for t in tasks], "repeats": repeats, "max_steps": max_steps,
        "rows": _public(rows), "orders": orders, "structural": structural,
        "plot": str(plot(rows, out_dir / PLOT, title)),
    }
    return result


__all__ = ["run_prune_bench"]
