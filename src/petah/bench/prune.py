"""`petah bench prune`: what pruning the shared backbone buys (latency, size) and costs (accuracy).

For each ratio the backbone is pruned once for all the demo tasks (Taylor importance on their
images together, then a short feature distillation), and every demo task is adapted on it with
the demo's own recipe. One more row lets ``--policy auto`` choose per-stage ratios for the task
set (``auto_max_loss``). Every row is also measured in int8 (pruned + int8): each task's merged
graph quantized on its own training images and scored on its validation part, and the backbone
graph quantized for latency. Latency is ONNX Runtime on the CPU at the backbone's working input
size: every row's float and int8 sessions are timed interleaved in one run on the same input
(median of repeats).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from petah import api
from petah.backbones import Backbone, create_backbone, save_backbone
from petah.data import load_builtin
from petah.demo import DEMO_PLANS, DEMO_TASKS, demo_backbone_path, run_demo
from petah.export.timing import ort_medians
from petah.prune import PruneConfig
from petah.runtime.onnx import to_onnx_bytes

PLOT = "prune-accuracy-latency.png"


def _pruned_backbones(backbone: Backbone, ratios: list[float], config: PruneConfig, datasets: list,
                      folder: Path, auto_max_loss: float | None = None) -> list[dict]:
    """Prune at every ratio; ratio 0 is the original backbone; with ``auto_max_loss`` a last row
    whose stage ratios ``--policy auto`` chose. Each is saved (its bytes are reported)."""
    rows = []
    configs = [(str(ratio), ratio, replace(config, ratio=ratio)) for ratio in ratios]
    if auto_max_loss is not None:
        configs.append((f"auto (max-loss {auto_max_loss:g})", None,
                        replace(config, policy="auto", max_loss=auto_max_loss)))
    for label, ratio, row_config in configs:
        start = time.perf_counter()
        if ratio == 0:
            pruned, report = backbone, {}
            path = folder / "ratio-0.safetensors"
            save_backbone(backbone, path)
        else:
            pruned, report = api.prune_backbone(backbone, config=row_config, datasets=datasets)
            path = api.save_pruned(pruned, report, folder / f"row-{len(rows)}.safetensors", command="petah bench prune")
        policy = report.get("policy")
        rows.append({
            "label": label, "ratio": ratio, "path": path, "backbone": pruned,
            **({"stage_ratios": policy["stage_ratios"], "predicted_loss_points": policy["predicted_loss_points"]}
               if policy else {}),
            **api.backbone_cost(pruned.model, pruned.img_size),
            "backbone_bytes": path.stat().st_size,
            "heads_removed": sum(report.get("heads_removed", {}).values()),
            "recovery": report.get("recovery", {}),
            "prune_seconds": round(time.perf_counter() - start, 1),
        })
    return rows


def _onnx_latencies(rows: list[dict], repeats: int, calibration: list | None = None) -> None:
    """Median ms per image of each row's backbone in ONNX Runtime, all interleaved on one input;
    with ``calibration`` (preprocessed image batches) also of each backbone graph in int8."""
    size = rows[0]["backbone"].img_size
    x = torch.randn(1, 3, size, size)
    graphs = {row["label"]: to_onnx_bytes(row["backbone"].model, x, f"row {row['label']}") for row in rows}
    if calibration is not None:
        from petah.export.int8 import quantize

        graphs.update({f"{label} int8": quantize(graph, calibration) for label, graph in list(graphs.items())})
    medians = ort_medians(graphs, x.numpy(), repeats)
    base = medians[rows[0]["label"]]
    for row in rows:
        for suffix, key in (("", ""), (" int8", "int8_")):
            if row["label"] + suffix in medians:
                row[f"{key}ort_ms"] = round(1e3 * medians[row["label"] + suffix], 3)
                row[f"{key}speedup"] = round(base / medians[row["label"] + suffix], 3)


def _adapt_tasks(rows: list[dict], tasks, max_steps: int | None, folder: Path) -> None:
    """Adapt every demo task (petah plan, the demo's recipe) on each row's backbone."""
    base_mean = None
    for row in rows:
        results = run_demo(folder / f"tasks-{row['path'].stem}", tasks, {"petah": DEMO_PLANS["petah"]}, row["path"],
                           max_steps)
        row["tasks"] = {r["task"]: {"metric": r["metric"], "score": r["score"], "package_bytes": r["package_bytes"]}
                        for r in results}
        row["packages"] = {r["task"]: Path(r["package"]) for r in results}
        row["mean_score"] = round(sum(r["score"] for r in results) / len(results), 4)
        base_mean = row["mean_score"] if base_mean is None else base_mean
        row["loss_points"] = round(100 * (base_mean - row["mean_score"]), 2)


def _int8_scores(rows: list[dict], tasks, calibration_images: int = 64) -> list:
    """Pruned + int8: every task's merged graph on each row's backbone, quantized on the task's own
    training images, scored on its validation part (the float scores are the adapted packages').
    Returns the first task's calibration batches on the unpruned backbone (for the latency graphs)."""
    from petah.data import load_dataset
    from petah.export.int8 import quantize, score
    from petah.export.onnx import calibration_sets
    from petah.packages import read_package
    from petah.runtime.onnx import merged_task_graph
    from petah.tasks import task_kind

    first = None
    data = {task.name: load_dataset(f"builtin:{task.dataset}") for task in tasks}  # read once for every row
    for row in rows:
        for task in tasks:
            package = read_package(row["packages"][task.name])
            graph, module, manifest = merged_task_graph(row["backbone"], package, task.name)
            calibration, validation = calibration_sets(manifest, data[task.name], calibration_images)
            first = first or calibration
            int8 = quantize(graph, calibration)
            kind = task_kind(manifest.task.kind)
            row["tasks"][task.name]["int8_score"] = round(
                score(int8, module.head, kind, validation, list(manifest.labels)) / 100, 4)
        row["int8_mean_score"] = round(sum(t["int8_score"] for t in row["tasks"].values()) / len(tasks), 4)
        row["int8_loss_points"] = round(100 * (rows[0]["mean_score"] - row["int8_mean_score"]), 2)
    return first


def _stored_bytes(row: dict) -> int:
    return row["backbone_bytes"] + sum(t["package_bytes"] for t in row["tasks"].values())


def _adapt_merge_prune(backbone: Backbone, tasks, ratio: float, config: PruneConfig, packages: dict[str, Path],
                       max_steps: int | None, folder: Path) -> dict:
    """The other order: each task's adapters (trained on the unpruned backbone) merged into its own
    copy, pruned on that task's images alone (distilling from the merged copy), then adapted again
    on it, since pruning changes the features the head sees. One backbone per task."""
    scores, stored = {}, 0
    for task in tasks:
        merged, _ = api.merged_backbone(backbone, packages[task.name])
        pruned, report = api.prune_backbone(merged, config=replace(config, ratio=ratio),
                                            datasets=[load_builtin(task.dataset)[0]])
        path = api.save_pruned(pruned, report, folder / f"{task.name}-{ratio}.safetensors", command="petah bench prune")
        row = run_demo(folder / f"{task.name}-{ratio}", (task,), {"petah": DEMO_PLANS["petah"]}, path, max_steps)[0]
        scores[task.name] = row["score"]
        stored += path.stat().st_size + row["package_bytes"]
    return {"ratio": ratio, "tasks": scores, "mean_score": round(sum(scores.values()) / len(scores), 4),
            "stored_bytes": stored}


def plot(rows: list[dict], path: Path, title: str) -> Path:
    """Score vs latency: each task faintly, the mean bold; float rows as diamonds, the same rows
    in int8 as squares (an arrow from each float row to its int8 point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.2, 4.4))
    xs = [r["ort_ms"] for r in rows]
    for task in rows[0]["tasks"]:  # each task faintly, the mean (the target's measure) bold
        ax.scatter(xs, [r["tasks"][task]["score"] for r in rows], s=18, alpha=0.5,
                   label=f"{task} ({rows[0]['tasks'][task]['metric']})")
    ax.scatter(xs, [r["mean_score"] for r in rows], s=60, color="black", marker="D", label="mean, float")
    int8 = [r for r in rows if "int8_ort_ms" in r and "int8_mean_score" in r]
    if int8:
        ax.scatter([r["int8_ort_ms"] for r in int8], [r["int8_mean_score"] for r in int8], s=60, color="tab:red",
                   marker="s", label="mean, int8")
        for r in int8:
            ax.annotate("", (r["int8_ort_ms"], r["int8_mean_score"]), (r["ort_ms"], r["mean_score"]),
                        arrowprops={"arrowstyle": "->", "color": "tab:red", "alpha": 0.5})
    for r in rows:
        ax.annotate(r["label"], (r["ort_ms"], r["mean_score"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
             if k not in ("backbone", "path", "packages")} for r in rows]


def run_prune_bench(out_dir: str | Path, ratios=(0.0, 0.25, 0.5), backbone_path: str | Path | None = None,
                    tasks=DEMO_TASKS, config: PruneConfig | None = None, repeats: int = 50,
                    max_steps: int | None = None, structural_models: tuple[str, ...] = ("efficientformer_l1",),
                    auto_max_loss: float | None = 1.0, int8: bool = True) -> dict:
    """The whole table: the demo backbone at each ratio (and as ``--policy auto`` chose, and each
    in int8), then structure/latency-only models."""
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
        rows = _pruned_backbones(backbone, ratios, config, datasets, Path(tmp), auto_max_loss)
        _adapt_tasks(rows, tasks, max_steps, Path(tmp))
        calibration = _int8_scores(rows, tasks) if int8 else None
        _onnx_latencies(rows, repeats, calibration)
        shared = max((r for r in rows if r["ratio"] is not None), key=lambda r: r["ratio"])
        orders = {
            "prune_then_adapt": {"ratio": shared["ratio"], "tasks": {k: v["score"] for k, v in shared["tasks"].items()},
                                 "mean_score": shared["mean_score"], "stored_bytes": _stored_bytes(shared)},
            "adapt_merge_prune": _adapt_merge_prune(backbone, tasks, shared["ratio"], config, rows[0]["packages"],
                                                    max_steps, Path(tmp)),
        }
    title = f"{backbone.name}@{backbone.img_size}px pruned (ratio or policy at the mean), demo tasks adapted"
    result = {
        "backbone": backbone.describe(), "img_size": backbone.img_size, "threads": torch.get_num_threads(),
        "config": config.to_dict(), "tasks": [t.name for t in tasks], "repeats": repeats, "max_steps": max_steps,
        "rows": _public(rows), "orders": orders, "structural": structural,
        "plot": str(plot(rows, out_dir / PLOT, title)),
    }
    return result


__all__ = ["run_prune_bench"]
