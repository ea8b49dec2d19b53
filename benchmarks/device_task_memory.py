"""How a task is held on the device engine: memory per task against speed, side by side in one run.

    python benchmarks/device_task_memory.py > benchmarks/results/device-task-memory-2026-12-07.json

The demo's device backbone (efficientformerv2_s0, 64 px) with classification packages of two
plans: ``petah`` (every layer adapted: the demo packages) and ``--budget 1%``-like (rank only in
the last stage, ``stage_ranks`` 0 elsewhere: most layers left as the backbone's). For each way of
opening a task's session, 8 tasks are opened one after the other in a fresh process and its
resident memory is read after each (``/proc/self/statm``); batch-1 latency is the median of 300
runs, interleaved across the ways. Ways:

* ``merged``: the device engine today: every weight in the task's graph, ONNX Runtime at
  ORT_ENABLE_ALL (folds BatchNorm into convs, NCHWc layouts, prepacked GEMMs: its own copies);
* ``merged-shared``: the same graph, but every weight the task does not change handed to ONNX
  Runtime as the backbone's own array (``SessionOptions.add_initializer``): shared across sessions
  where ONNX Runtime uses it as is;
* ``shared-extended``: as ``merged-shared`` at ORT_ENABLE_EXTENDED with prepacking off, so that
  ONNX Runtime copies no shared weight (no layout transform, no prepacked copy).
"""

import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WAYS = ("merged", "merged-shared", "shared-extended")
TASKS = 8


def rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def open_sessions(way: str, packages: list[str], queue) -> None:
    import onnx
    import onnxruntime as ort

    from petah.device import task_graph
    from petah.device.session import session_options
    from petah.device.task import merged_weights
    from petah.packages import read_package
    from petah.serve import demo_device_backbone

    backbone = demo_device_backbone()
    shared = {name: ort.OrtValue.ortvalue_from_numpy(backbone.weights[key]) for key, name in backbone.index.items()}
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    before = rss()
    rows, sessions = [], []
    for path in packages:
        package = read_package(path)
        graph = task_graph(backbone, package, path)
        options = session_options(1)
        if way != "merged":
            changed = {backbone.index[k] for k in merged_weights(backbone, package, path)}
            names = {init.name for init in onnx.load_from_string(graph.graph).graph.initializer}
            for name, value in shared.items():
                if name in names and name not in changed:
                    options.add_initializer(name, value)
        if way == "shared-extended":
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
            options.add_session_config_entry("session.disable_prepacking", "1")
        session = ort.InferenceSession(graph.graph, options, providers=["CPUExecutionProvider"])
        session.run(None, {"image": x})
        sessions.append(session)
        rows.append({"tasks": len(sessions), "resident_bytes": rss(), "added_bytes": rss() - before})
    times = []
    for _ in range(300):
        for session in sessions[:1]:
            began = time.perf_counter()
            session.run(None, {"image": x})
            times.append(time.perf_counter() - began)
    queue.put({"way": way, "rows": rows, "batch1_ms": round(1000 * statistics.median(times), 3),
               "bytes_per_task": round((rows[-1]["resident_bytes"] - rows[0]["resident_bytes"]) / (len(rows) - 1))})


def budget_packages(folder: Path) -> list[str]:
    """Packages whose plans adapt the last stage only (the rest of the backbone left as it is)."""
    from petah.backbones import create_backbone, demo_backbone_path
    from petah.packages import write_package
    from petah.plans import PlanConfig
    from petah.testing import synthetic_package

    backbone = create_backbone(weights=str(demo_backbone_path()))
    plan = PlanConfig(stage_ranks={0: 0, 1: 0, 2: 0})
    return [str(write_package(folder / f"late-{i}.petah", synthetic_package(backbone, f"late{i}", plan, classes=10,
                                                                          seed=i))) for i in range(TASKS)]


def main() -> None:
    from petah.serve import demo_packages

    digits = next(str(p) for p in demo_packages() if p.stem == "digits")
    with tempfile.TemporaryDirectory() as tmp:
        plans = {"petah (every layer adapted)": [digits] * TASKS, "last stage only": budget_packages(Path(tmp))}
        context = multiprocessing.get_context("spawn")  # each way in a fresh process: its memory is its own
        results = {}
        for plan, packages in plans.items():
            results[plan] = []
            for way in WAYS:
                queue = context.Queue()
                process = context.Process(target=open_sessions, args=(way, packages, queue))
                process.start()
                results[plan].append(queue.get(timeout=600))
                process.join()
    flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("Model name")), "")
    print(json.dumps({"cpu": model or platform.processor(), "python": sys.version.split()[0], "tasks": TASKS,
                      "results": results}, indent=1))


if __name__ == "__main__":
    main()
