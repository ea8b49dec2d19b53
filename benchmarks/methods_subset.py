"""A few methods of ``petah bench methods`` on its main grid, side by side, without the rest of it.

    python benchmarks/methods_subset.py --methods petah-r8-plain,petah-r8 [--seeds 3] [--out FILE.json]

The same grid as the bench's default mode on the demo backbone (tasks digits / textures / faces,
3 epochs, at most 600 training images, each method's rate chosen on val with seed 0, then the
other seeds at that rate, scored on the test set), through the bench's own runner: a change of a
default is judged here by the adoption rule (docs/benchmarks.md) before the whole grid is run.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
from pathlib import Path


def main() -> None:
    from petah.bench.methods import Grid, Runner, run_grid
    from petah.demo import demo_backbone_path

    parser = argparse.ArgumentParser()
    parser.add_argument("--methods", required=True)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    with tempfile.TemporaryDirectory() as sources, Runner() as run:
        result = run_grid(Grid(str(demo_backbone_path()), methods, seeds=args.seeds), run, Path(sources))
    table = result["table"]
    rows = {}
    for task, by_method in table.items():
        for method, row in by_method.items():
            rows.setdefault(method, {})[task] = {
                "test_mean": row["test_mean"], "test_std": row["test_std"],
                "standard_error": round(row["test_std"] / math.sqrt(row["seeds"]), 4), "rates": row["rates"],
                "stored_bytes": row["stored_bytes"], "train_seconds": row["train_seconds"]}
    means = {m: round(sum(t["test_mean"] for t in by_task.values()) / len(by_task), 4) for m, by_task in rows.items()}
    report = {"methods": rows, "mean_over_tasks": means, "cpu": platform.processor() or platform.machine(),
              "runs": result["runs"]}
    print(json.dumps({"methods": rows, "mean_over_tasks": means}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
