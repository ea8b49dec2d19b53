"""The build side's task verbs: prepare a backbone, adapt a task, evaluate, predict, the demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from petah.cli.common import (
    AdapterDtypeOpt,
    BackboneOpt,
    DataArg,
    DataOpt,
    HflipOpt,
    JsonOpt,
    NoAugmentOpt,
    RequireSignedOpt,
    SizeOpt,
    StrictOpt,
    TrustOpt,
    ValSplitOpt,
    WeightsOpt,
    augment,
    backbone,
    command_line,
    config_options,
    data_spec,
    emit_json,
    err,
    given_options,
    out,
    trust_policy,
    warn_skipped,
)
from petah.cli.show import stage_rows
from petah.data.images import DEFAULT_INTENSITY
from petah.errors import PetahError
from petah.packages import read_manifest
from petah.plans import PlanConfig
from petah.tasks.anomaly import AnomalyConfig
from petah.train.distributed import is_main_process
from petah.train.trainer import TrainConfig


@config_options(TrainConfig, "training", exclude=("head_lr", "lora_plus", "lp_ft"),
                defaults={"epochs": 5, "batch_size": 128})
def prepare(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. efficientformerv2_s0.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Backbone file to write (.safetensors).")],
    data: DataArg = None,
    data_opt: DataOpt = None,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="float32 | float16 | bfloat16")] = "float32",
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    val_split: ValSplitOpt = None,
    hflip: HflipOpt = False,
    no_augment: NoAugmentOpt = False,
    json_out: JsonOpt = False,
    training: TrainConfig = None,
) -> None:
    """Step 1: fully train (or fine-tune) a backbone on a source dataset; save it as a backbone file."""
    import torch

    from petah import api
    from petah.data import load_dataset

    api.check_writable(output)  # before the data is read; api.prepare checks again
    torch.manual_seed(training.seed)
    train, val = load_dataset(data_spec(data, data_opt), val_split, training.seed)
    bb, metrics = api.prepare(model, train, val, output, img_size=img_size, weights=weights, config=training,
                              augment=augment(hflip, no_augment), save_dtype=save_dtype, command=command_line())
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return
    summary = {"backbone": bb.name, "img_size": bb.img_size, "fingerprint": bb.fingerprint,
               "output": str(output), "output_bytes": output.stat().st_size, "accuracy": metrics["accuracy"]}
    if json_out:
        emit_json(summary)
    else:
        out.print(f"wrote {output} ({summary['output_bytes']:,} bytes): {bb.describe()}, "
                  f"source accuracy {metrics['accuracy']:.4f}")


def _score_table(title: str, column: str, scores: dict) -> Table:
    """One score per class; a class absent from the data has none (shown as -)."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column(column, justify="right")
    for name, score in scores.items():
        table.add_row(name, "-" if score is None else f"{score:.3f}")
    return table


def metrics_table(title: str, report: dict) -> Table:
    if "image_auroc" in report:  # anomaly
        table = Table(title=f"{title}: image AUROC {_or_dash(report['image_auroc'])}, pixel AUROC "
                            f"{_or_dash(report['pixel_auroc'])} on {report['images']} images "
                            f"({report['anomalous_images']} anomalous)")
        for col in ("threshold", "precision", "recall", "F1", "false rejects"):
            table.add_column(col, justify="right")
        table.add_row(*(f"{report[k]:.3f}" for k in ("threshold", "precision", "recall", "f1", "false_reject_rate")))
        return table
    if "mAP" in report:  # detection
        return _score_table(f"{title}: mAP {report['mAP']:.4f}, mAP@.5 {report['mAP50']:.4f} on "
                            f"{report['samples']} images", "AP", report["per_class_ap"])
    if "mIoU" in report:  # segmentation
        return _score_table(f"{title}: mIoU {report['mIoU']:.4f}, pixel accuracy {report['accuracy']:.4f} on "
                            f"{report['samples']} images", "IoU", report["per_class_iou"])
    table = Table(title=f"{title}: accuracy {report['accuracy']:.4f} on {report['samples']} images")
    for col in ("class", "precision", "recall"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, values in report["per_class"].items():
        table.add_row(name, f"{values['precision']:.3f}", f"{values['recall']:.3f}")
    return table


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


IntensityOpt = Annotated[str, typer.Option(
    "--intensity", help="Images deeper than 8 bits (16-bit): dtype (scale by the type's range) | range (each "
                        "image's min..max) | percentile (each image's 0.5..99.5 percentiles). Recorded in the "
                        "package; eval and predict use it. 8-bit images are unaffected.")]


@config_options(PlanConfig, "plan")
@config_options(TrainConfig, "training")
@config_options(AnomalyConfig, "anomaly")
def adapt(
    context: typer.Context,
    backbone_spec: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Package file to write (.petah).")],
    data: DataArg = None,
    data_opt: DataOpt = None,
    name: Annotated[str | None, typer.Option("--name", help="Task name (default: the output file's stem).")] = None,
    task: Annotated[str | None, typer.Option(
        "--task", help="classification | segmentation | detection (default: what DATA is labelled for).")] = None,
    dice: Annotated[bool, typer.Option("--dice", help="Segmentation: add a soft-dice term to the cross-entropy.")
                    ] = False,
    strict: StrictOpt = False,
    adapter_dtype: AdapterDtypeOpt = "float16",
    confusion_png: Annotated[Path | None, typer.Option("--confusion-png",
                                                          help="Write the confusion matrix as a PNG.")] = None,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    val_split: ValSplitOpt = None,
    hflip: HflipOpt = False,
    no_augment: NoAugmentOpt = False,
    intensity: IntensityOpt = DEFAULT_INTENSITY,
    json_out: JsonOpt = False,
    training: TrainConfig = None,
    plan: PlanConfig = None,
    anomaly: AnomalyConfig = None,
) -> None:
    """Step 2: train one task's adapters + head on a frozen backbone; write a .petah package
    (anomaly: fit a memory bank of good patches on the frozen backbone)."""
    import torch

    from petah import api
    from petah.data import load_dataset
    from petah.tasks import plot_confusion

    api.check_writable(output)  # before the backbone and data load; api.adapt checks again
    if confusion_png is not None:  # written after training: checked before it
        api.check_writable(confusion_png)
    torch.manual_seed(training.seed)
    bb = backbone(backbone_spec, weights, img_size)
    train, val = load_dataset(data_spec(data, data_opt), val_split, training.seed, strict, intensity=intensity,
                              task=task)
    kind = api.check_task(task, train)  # refused before any training (api.adapt checks again)
    plan = api.default_plan(kind, bb, len(train.classes), plan, given_options(context, "plan"))
    training = api.default_training(kind, len(train), training, given_options(context, "training"))
    warn_skipped(train)
    task_name = name or output.stem
    result = api.adapt(bb, train, val, plan=plan, config=training, task_name=task_name,
                       augment=augment(hflip, no_augment), adapter_dtype=adapter_dtype, dice=dice, task=task,
                       output=output, anomaly=anomaly)
    if not is_main_process():  # under torchrun, rank 0 alone writes and reports
        return
    if confusion_png and kind.kind == "classification":
        plot_confusion(result.metrics, confusion_png, f"{task_name} ({plan.preset})")
    info = api.inspect_package(output)
    summary = {
        "package": str(output), "task": info["task"]["name"], "kind": kind.kind,
        "plan": result.package.manifest.training.get("method", plan.preset),  # anomaly: its method
        "accuracy": result.metrics["accuracy"], kind.primary_metric: result.metrics[kind.primary_metric],
        "skipped_samples": len(getattr(train, "skipped", [])),
        "package_bytes": info["package_bytes"], "backbone_bytes": info["backbone_bytes"], "ratio": info["ratio"],
        "train_seconds": round(result.train.seconds, 2), "images_per_second": round(result.train.images_per_second, 1),
        "metrics": result.metrics,
    }
    allocation = result.package.manifest.training.get("allocation")
    if allocation:
        summary["allocation"] = allocation
    if json_out:
        emit_json(summary)
        return
    out.print(metrics_table(summary["task"], result.metrics))
    if allocation:
        out.print(f"--budget {plan.budget} = {allocation['budget_bytes']:,} bytes ({allocation['method']}, "
                  f"{allocation['seconds']:.1f} s): LoRA on {allocation['lora_layers']} layers, "
                  f"{allocation['channel_scales']} channel scales, {allocation['owned_norm_layers']} owned norm layers")
        for stage, text in stage_rows(allocation["stages"]):
            out.print(f"{stage}: {text}")
    out.print(f"wrote {output}: {info['package_bytes']:,} bytes = {100 * info['ratio']:.2f} % of the backbone; "
              f"trained {summary['train_seconds']:.1f} s")


def eval_(
    package: Annotated[Path, typer.Argument(help="A .petah task package.")],
    backbone_spec: BackboneOpt,
    data: DataArg = None,
    data_opt: DataOpt = None,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    val_split: Annotated[float | None, typer.Option("--val-split", help="Evaluate on this held-out fraction.")
                         ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --val-split.")] = 0,
    confusion_png: Annotated[Path | None, typer.Option(
        "--confusion-png", help="Write the confusion matrix as a PNG (classification).")] = None,
    strict: StrictOpt = False,
    trust: TrustOpt = None,
    require_signed: RequireSignedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a package on the validation part of DATA (classification: top-1, per-class precision /
    recall, confusion; segmentation: mIoU, per-class IoU, pixel accuracy; detection: mAP, mAP50,
    mAP75, per-class AP)."""
    from petah import api
    from petah.data import load_dataset
    from petah.tasks import plot_confusion

    policy = trust_policy(trust, require_signed, [package])  # before the backbone and data load
    if confusion_png is not None:
        api.check_writable(confusion_png)
    bb = backbone(backbone_spec, weights, img_size)
    manifest = read_manifest(package)  # the images as the package was trained on them (intensity), its kind
    _train, val = load_dataset(data_spec(data, data_opt), val_split, seed, strict, intensity=manifest.intensity,
                               task=manifest.task.kind)
    warn_skipped(val)
    report = api.evaluate(bb, package, val, trust=policy)
    if confusion_png and "confusion_matrix" in report:
        plot_confusion(report, confusion_png, package.stem)
    if json_out:
        emit_json({"package": str(package), "metrics": report})
    else:
        out.print(metrics_table(package.stem, report))


def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    backbone_spec: BackboneOpt,
    package: Annotated[list[Path], typer.Option("--package", "-p",
                                                help="A .petah package; repeat for several tasks.")],
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes reported per image (classification).")] = 3,
    jsonl: Annotated[bool, typer.Option(
        "--jsonl", help="One JSON line per image; a bad file gets an error line and the rest go on.")] = False,
    out_dir: Annotated[Path, typer.Option(
        "--out-dir", help="Dense tasks: where mask PNGs and overlays (masks, boxes) go.")] = Path("predictions"),
    trust: TrustOpt = None,
    require_signed: RequireSignedOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run one or more task packages on images with one shared backbone (segmentation masks and
    mask / box overlays are written to --out-dir)."""
    from petah import api
    from petah.packages import TrustPolicy

    policy = TrustPolicy.from_options(trust, require_signed)  # a bad trust folder fails before any loading
    bb = backbone(backbone_spec, weights, img_size)
    # --jsonl goes on past a bad file; otherwise a bad file fails before any overlay is written
    entries = api.predict_files(bb, list(package), images, top_k=top_k, out_dir=out_dir, keep_going=jsonl,
                                trust=policy)
    if jsonl:
        failed = 0
        for entry in entries:
            failed += "error" in entry
            emit_json(entry)
        if failed:
            err.print(f"[red]error:[/red] {failed} file(s) could not be read (see their JSON lines)", highlight=False)
            raise typer.Exit(1)
        return
    entries = list(entries)
    names = list(entries[0]["tasks"])
    if json_out:
        emit_json({"images": [e["image"] for e in entries],
                   "tasks": {n: [e["tasks"][n] for e in entries] for n in names}})
        return
    table = Table(title="predictions")
    table.add_column("image")
    for name in names:
        table.add_column(name)
    for entry in entries:
        table.add_row(entry["image"], *[_describe(entry["tasks"][n]) for n in names])
    out.print(table)


def _describe(result: dict) -> str:
    if "anomalous" in result:
        verdict = "ANOMALY" if result["anomalous"] else "good"
        return f"{verdict} ({result['score']:.3f} vs {result['threshold']:.3f})" + (
            f" → {result['overlay']}" if "overlay" in result else "")
    if "label" in result:
        return f"{result['label']} ({result['score']:.2f})"
    if "boxes" in result:
        found = ", ".join(f"{b['label']} ({b['score']:.2f})" for b in result["boxes"][:5])
        return f"{len(result['boxes'])} boxes: {found}" if found else "no boxes"
    shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in sorted(result["pixels"].items(), key=lambda cf: -cf[1]))
    return shares + (f" → {result['mask']}" if "mask" in result else "")


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's task packages.")
                      ] = Path("demo-out"),
    max_steps: Annotated[int | None, typer.Option(
        "--max-steps", help="Cap each training run, and keep 1 % of the anomaly task's patches (a quick look; "
                            "accuracy suffers).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline demo: adapt the bundled backbone to classification, segmentation and detection tasks
    (the classification ones with two plans) and fit an anomaly task on good surfaces; print a table."""
    from petah.demo import DEMO_ANOMALY_TASKS, run_demo

    if max_steps is not None and max_steps < 1:
        raise PetahError(f"--max-steps must be at least 1, got {max_steps}")
    rows = run_demo(output, max_steps=max_steps, anomaly_tasks=DEMO_ANOMALY_TASKS)
    if json_out:
        emit_json({"tasks": rows})
        return
    table = Table(title=f"petah demo: packages in {output}/")
    for col in ("task", "plan", "metric", "score", "package", "% of backbone", "train s"):
        table.add_column(col, justify="left" if col in ("task", "plan", "metric") else "right")
    for r in rows:
        table.add_row(r["task"], r["plan"], r["metric"], f"{r['score']:.4f}", f"{r['package_bytes']:,} B",
                      f"{100 * r['package_bytes'] / r['backbone_bytes']:.2f}", f"{r['train_seconds']:.1f}")
    out.print(table)


COMMANDS = {"prepare": prepare, "adapt": adapt, "eval": eval_, "predict": predict, "demo": demo}
