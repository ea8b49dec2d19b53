"""``petah bench int8``: what int8 costs in accuracy and buys in speed, float vs int8 in one run.

1. The four demo tasks on the demo backbone (64 px): the task metric of the float merged graph,
   of the int8 graph (``--int8``) and of what ``--int8 auto`` writes, on each task's validation
   images; ONNX Runtime latency of the three, interleaved; file sizes.
2. Latency at 224 px for other families (random weights and a synthetic classification package:
   speed does not depend on the values), calibrated on real images (digits) resized to 224.
3. Accuracy after adaptation for other families at 64 px, as ``petah bench methods`` measures
   them: a source backbone the bench trains (cached, the methods bench's recipe), digits adapted
   with the petah plan at rank 4 (600 images, 3 epochs), float vs int8 merged graph on the test set.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from petah.backbones import create_backbone, demo_backbone_path
from petah.data import load_dataset
from petah.export.int8 import int8_graph, latency_ms, quantize, score
from petah.export.onnx import calibration_sets
from petah.packages import read_package
from petah.plans import PlanConfig
from petah.runtime.onnx import merged_task_graph
from petah.tasks import task_kind
from petah.testing import synthetic_package

DEMO_DATA = {"digits": "builtin:digits", "textures": "builtin:textures", "defects": "builtin:defects",
             "digit-boxes": "builtin:digit-boxes", "surfaces": "builtin:surface-anomalies"}
FAMILIES = ("efficientformerv2_s0", "mobilevitv2_050", "fastvit_sa12")
TRANSFER_FAMILIES = ("mobilevitv2_050", "fastvit_sa12")


def demo_rows(calibration_images: int, repeats: int) -> list[dict]:
    from petah.serve import demo_packages

    backbone = create_backbone(weights=str(demo_backbone_path()))
    rows = []
    for path in demo_packages():
        package = read_package(path)
        graph, module, manifest = merged_task_graph(backbone, package, path.stem)
        head = module.head
        kind = task_kind(manifest.task.kind)
        calibration, validation = calibration_sets(manifest, load_dataset(DEMO_DATA[manifest.task.name]),
                                                   calibration_images)
        int8 = quantize(graph, calibration)
        auto, report = int8_graph(graph, head, kind, calibration, mode="auto", validation=validation,
                                  classes=list(manifest.labels))
        scores = {name: score(g, head, kind, validation, list(manifest.labels))
                  for name, g in (("float", graph), ("int8", int8))}
        times = latency_ms({"float": graph, "int8": int8, "auto": auto}, calibration[0][:1], repeats)
        rows.append({"task": manifest.task.name, "kind": kind.kind, "metric": kind.primary_metric,
                     "float": round(scores["float"], 2), "int8": round(scores["int8"], 2),
                     "delta": round(scores["int8"] - scores["float"], 2),
                     "auto_quantized": report.quantized, "auto_reason": report.reason,
                     "float_ms": round(times["float"], 3), "int8_ms": round(times["int8"], 3),
                     "auto_ms": round(times["auto"], 3),
                     "int8_speedup": round(times["float"] / times["int8"], 3),
                     "auto_speedup": round(times["float"] / times["auto"], 3),
                     "float_bytes": len(graph), "int8_bytes": len(int8)})
    return rows


def family_rows(families: tuple[str, ...], size: int, repeats: int) -> list[dict]:
    from petah.data import Preprocess
    from petah.export.int8 import CALIBRATION_BATCH, batches
    from petah.tasks import Classification

    train, _ = load_dataset("builtin:digits")
    rows = []
    for name in families:
        backbone = create_backbone(name, img_size=size)
        package = synthetic_package(backbone, "bench", PlanConfig(preset="petah"), classes=10)
        graph, _module, manifest = merged_task_graph(backbone, package, name)
        calibration = batches(Classification, train.subset(list(range(0, 320, 20))),
                              Preprocess.from_dict(manifest.preprocessing), CALIBRATION_BATCH)
        int8 = quantize(graph, calibration)
        times = latency_ms({"float": graph, "int8": int8}, calibration[0][:1], repeats)
        rows.append({"backbone": name, "img_size": size, "float_ms": round(times["float"], 3),
                     "int8_ms": round(times["int8"], 3), "int8_speedup": round(times["float"] / times["int8"], 3),
                     "float_bytes": len(graph), "int8_bytes": len(int8)})
    return rows


def transfer_rows(families: tuple[str, ...], sources, calibration_images: int, repeats: int) -> list[dict]:
    """int8 accuracy on other families: each adapted to digits from its bench-trained source."""
    from petah import api
    from petah.bench.methods import BUDGET_RATES, REFERENCES, _log, _run, _splits, source_backbone
    from petah.export.int8 import CALIBRATION_BATCH, batches
    from petah.tasks import Classification
    from petah.train import TrainConfig

    rows = []
    train, val, test = _splits("digits", None, 600)
    for name in families:
        # the methods bench's cached source (trained here, in this process, when missing)
        path = Path(source_backbone(REFERENCES[name], sources, _run, _log)["path"])
        backbone = create_backbone(weights=str(path))
        torch.manual_seed(0)
        lr, head_lr = BUDGET_RATES
        adapted = api.adapt(backbone, train, val, plan=PlanConfig(rank=4), task_name="digits",
                            config=TrainConfig(epochs=3, batch_size=64, lr=lr, head_lr=head_lr, progress=False))
        graph, module, manifest = merged_task_graph(backbone, adapted.package, name)
        preprocess = api.preprocess_for(backbone)
        calibration = batches(Classification, train, preprocess, CALIBRATION_BATCH, calibration_images)
        tests = list(api.eval_loader(test, preprocess))
        int8 = quantize(graph, calibration)
        scores = {k: score(g, module.head, Classification, tests, list(manifest.labels))
                  for k, g in (("float", graph), ("int8", int8))}
        times = latency_ms({"float": graph, "int8": int8}, calibration[0][:1], repeats)
        rows.append({"backbone": name, "img_size": backbone.img_size, "source": str(path.name),
                     "float": round(scores["float"], 2), "int8": round(scores["int8"], 2),
                     "delta": round(scores["int8"] - scores["float"], 2), "float_ms": round(times["float"], 3),
                     "int8_ms": round(times["int8"], 3), "int8_speedup": round(times["float"] / times["int8"], 3)})
    return rows


def run_int8_bench(families: tuple[str, ...] = FAMILIES, size: int = 224, calibration_images: int = 64,
                   repeats: int = 40, transfer_families: tuple[str, ...] = TRANSFER_FAMILIES,
                   sources=None) -> dict:
    started = time.time()
    demo = demo_rows(calibration_images, repeats)
    other = family_rows(families, size, max(10, repeats // 2))
    transfer = transfer_rows(transfer_families, Path(sources or "bench-methods/sources"), calibration_images,
                             repeats) if transfer_families else []
    return {"demo_tasks": demo, "families": other, "transfer": transfer, "threads": torch.get_num_threads(),
            "calibration_images": calibration_images, "wall_s": round(time.time() - started, 1)}


__all__ = ["FAMILIES", "run_int8_bench"]
