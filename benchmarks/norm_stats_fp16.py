"""Does storing a task's own BatchNorm statistics in fp16 cost accuracy?

    python benchmarks/norm_stats_fp16.py > benchmarks/results/norm-stats-fp16-2026-12-01.json

The demo backbone, the petah plan with ``task_norm="stats"`` on textures, digits and defects (the
demo's epochs and rates). Each task is trained once and saved with fp32 tensors (petah stores
the statistics in fp16 by default, so the fp32 original must be asked for); the same package is
written with its running mean / var in fp32 and in fp16 and both are evaluated on the validation
split, so the difference is the storage of the statistics alone (about 1.5 minutes on 2 CPU cores).
"""

import json
import sys

import torch

from petah import api
from petah.backbones import create_backbone, demo_backbone_path
from petah.data import Augment, load_builtin
from petah.packages import TaskPackage, read_package, write_package
from petah.packages.format import NORM_STATISTICS
from petah.plans import PlanConfig
from petah.train import TrainConfig


def main(folder: str = "/tmp") -> list[dict]:
    backbone = create_backbone(weights=str(demo_backbone_path()))
    rows = []
    for task, epochs, batch in (("textures", 6, 64), ("digits", 4, 64), ("defects", 10, 32)):
        train, val = load_builtin(task)
        torch.manual_seed(0)
        result = api.adapt(backbone, train, val, plan=PlanConfig(preset="petah", task_norm="stats"),
                           config=TrainConfig(epochs=epochs, batch_size=batch, lr=2e-3, head_lr=1e-2, progress=False),
                           task_name=task, augment=Augment(), dice=task == "defects", adapter_dtype="float32")
        package = read_package(api.save_package(result, f"{folder}/norm-stats-{task}.petah"))
        paths = {}
        for dtype in (torch.float32, torch.float16):
            tensors = {k: v.to(dtype) if k.endswith(NORM_STATISTICS) else v for k, v in package.tensors.items()}
            paths[dtype] = write_package(f"{folder}/norm-stats-{task}-{dtype}.petah", TaskPackage(package.manifest,
                                                                                                 tensors))
        metric = "mIoU" if task == "defects" else "accuracy"
        rows.append({"task": task, "metric": metric,
                     "fp32_stats": api.evaluate(backbone, paths[torch.float32], val)[metric],
                     "fp16_stats": api.evaluate(backbone, paths[torch.float16], val)[metric],
                     "bytes_fp32": paths[torch.float32].stat().st_size,
                     "bytes_fp16": paths[torch.float16].stat().st_size})
        print(rows[-1], file=sys.stderr)
    return rows


if __name__ == "__main__":
    print(json.dumps({"rows": main()}, indent=1))
