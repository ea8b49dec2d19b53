"""The ``petah`` command line: parses, calls the library, prints. No logic the API lacks."""

from __future__ import annotations

import functools
import inspect
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from petah.errors import PetahError
from petah.train.distributed import is_main_process

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient task adaptation of hybrid vision transformers.")
out = Console()
err = Console(stderr=True)
STATE = {"debug": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="A petah backbone file, or a timm model name.")]
WeightsOpt = Annotated[str, typer.Option(help="Weights for a timm name: none | hub | FILE (.safetensors or torch state dict).")]
SizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input size (fixed when the backbone is built).")]
PlanOpt = Annotated[str, typer.Option(help="petah | attn-lora | bitfit | linear-probe | full")]
RankOpt = Annotated[int, typer.Option(help="LoRA rank.")]
AlphaOpt = Annotated[Optional[float], typer.Option(help="LoRA alpha (default 2 x rank).")]
StageRankOpt = Annotated[Optional[list[str]], typer.Option("--stage-rank", help="Per-stage rank, STAGE=RANK; 0 leaves a stage unadapted. Repeatable.")]
TaskNormOpt = Annotated[str, typer.Option("--task-norm", help="none | affine | stats: what of the norm layers the task owns.")]
TargetOpt = Annotated[Optional[list[str]], typer.Option("--target", help="Regex naming layers to adapt (a generic plan for any timm model). Repeatable.")]
_DATA_HELP = ("An image folder (class sub-folders; train/ + val/ or --val-split), a segmentation folder (images/ + masks/ + "
              "classes.txt), a COCO JSON (or a folder with annotations.json), or builtin:NAME.")
DataArg = Annotated[Optional[str], typer.Argument(help=_DATA_HELP, show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option("--data", help="The same as the DATA argument.", show_default=False)]


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    STATE["debug"] = debug


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")


def _backbone(spec: str, weights: str, img_size: Optional[int]):
    from petah.backbones import create_backbone

    if Path(spec).suffix == ".safetensors":  # a petah backbone file carries its name and size
        if not Path(spec).is_file():
            raise PetahError(f"backbone file not found: {spec}")
        return create_backbone(img_size=img_size, weights=spec)
    return create_backbone(spec, img_size, weights)


@dataclass
class TrainingArgs:
    """The options every training command shares (filled in by ``training_options``)."""

    weights: str
    img_size: Optional[int]
    epochs: int
    batch_size: int
    lr: float
    seed: int
    val_split: Optional[float]
    hflip: bool
    no_augment: bool
    checkpoint_dir: Optional[Path]
    checkpoint_every: int
    resume: bool
    label_smoothing: float
    max_steps: Optional[int]
    workers: int

    def config(self, head_lr: Optional[float] = None):
        from petah.train import TrainConfig

        return TrainConfig(
            epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, head_lr=head_lr, seed=self.seed,
            checkpoint_dir=str(self.checkpoint_dir) if self.checkpoint_dir else None,
            checkpoint_every=self.checkpoint_every, resume=self.resume, label_smoothing=self.label_smoothing,
            max_steps=self.max_steps, num_workers=self.workers,
        )

    def augment(self):
        from petah.data import Augment

        return None if self.no_augment else Augment(hflip=self.hflip)


TRAINING_OPTIONS = [  # name, annotation, default
    ("weights", WeightsOpt, "none"),
    ("img_size", SizeOpt, None),
    ("epochs", Annotated[int, typer.Option(help="Training epochs.")], 10),
    ("batch_size", Annotated[int, typer.Option("--batch-size", help="Images per step.")], 64),
    ("lr", Annotated[float, typer.Option(help="Peak learning rate.")], 2e-3),
    ("seed", Annotated[int, typer.Option(help="Seed for data order, augmentation and init.")], 0),
    ("val_split", Annotated[Optional[float], typer.Option("--val-split", help="Hold out this fraction for validation.")], None),
    ("hflip", Annotated[bool, typer.Option("--hflip", help="Random horizontal flips.")], False),
    ("no_augment", Annotated[bool, typer.Option("--no-augment", help="No augmentation.")], False),
    ("checkpoint_dir", Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Write resumable checkpoints here.")], None),
    ("checkpoint_every", Annotated[int, typer.Option("--checkpoint-every", help="Also checkpoint every N steps.")], 0),
    ("resume", Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --checkpoint-dir.")], False),
    ("label_smoothing", Annotated[float, typer.Option("--label-smoothing")], 0.1),
    ("max_steps", Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps.")], None),
    ("workers", Annotated[int, typer.Option("--workers", help="Data loader worker processes.")], 0),
]


def training_options(**defaults):
    """Add the shared training options to a command; it receives them as ``training: TrainingArgs``."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # real types: typer reads them
        own = [p for p in signature.parameters.values() if p.name != "training"]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=defaults.get(name, default), annotation=annotation)
            for name, annotation, default in TRAINING_OPTIONS
        ]

        @functools.wraps(command)
        def wrapper(**kwargs):
            shared = {name: kwargs.pop(name) for name, _, _ in TRAINING_OPTIONS}
            return command(training=TrainingArgs(**shared), **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + extra)
        wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != "training"}
        return wrapper

    return decorate


@app.command()
@training_options(epochs=5, batch_size=128)
def prepare(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. efficientformerv2_s0.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Backbone file to write (.safetensors).")],
    data: DataArg = None,
    data_opt: DataOpt = None,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="float32 | float16 | bfloat16")] = "float32",
    json_out: JsonOpt = False,
    training: TrainingArgs = None,
) -> None:
    """Step 1: fully train (or fine-tune) a backbone on a source dataset; save it as a backbone file."""
    import torch

    from petah import api
    from petah.data import load_dataset

    if save_dtype not in api.DTYPES:
        raise PetahError(f"--save-dtype must be one of {', '.join(api.DTYPES)}")
    torch.manual_seed(training.seed)
    train, val = load_dataset(_data(data, data_opt), training.val_split, training.seed)
    backbone, metrics = api.prepare(model, train, val, output, training.img_size, training.weights, training.config(),
                                    training.augment(), save_dtype, _command_line())
    if not is_main_process():  # under torchrun, rank 0 alone reports
        return
    summary = {"backbone": backbone.name, "img_size": backbone.img_size, "fingerprint": backbone.fingerprint,
               "output": str(output), "output_bytes": output.stat().st_size, "accuracy": metrics["accuracy"]}
    if json_out:
        emit_json(summary)
    else:
        out.print(f"wrote {output} ({summary['output_bytes']:,} bytes): {backbone.describe()}, source accuracy {metrics['accuracy']:.4f}")


def _command_line() -> str:
    """How this run was invoked, recorded in the files it writes."""
    return "petah " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _data(argument: Optional[str], option: Optional[str]) -> str:
    """DATA as an argument or as --data (one of them)."""
    if argument is not None and option is not None and argument != option:
        raise PetahError(f"two datasets given: {argument} and --data {option}")
    if argument is None and option is None:
        raise PetahError("no dataset given: pass DATA (or --data DATA)")
    return argument if argument is not None else option


def _check_task(task: Optional[str], train, data: str):
    """The task kind the data is labelled for; --task, when given, must agree."""
    from petah.tasks import TASK_KINDS, kind_for_data

    kind = kind_for_data(train)
    if task is not None and task not in TASK_KINDS:
        raise PetahError(f"unknown --task {task!r}; choose one of {', '.join(TASK_KINDS)}")
    if task is not None and task != kind.kind:
        raise PetahError(f"--task {task}: {data} is labelled for {kind.kind} (segmentation: images/ + masks/ + "
                         "classes.txt, or builtin:defects; detection: a COCO annotations.json, or builtin:digit-boxes)")
    _warn_skipped(train)
    return kind


def _warn_skipped(data) -> None:
    skipped = getattr(data, "skipped", [])
    if skipped:
        err.print(f"[yellow]warning:[/yellow] skipped {len(skipped)} bad sample(s) (--strict fails instead); first: {skipped[0]}",
                  highlight=False, soft_wrap=True)  # one line, however long the path


def _plan(plan, rank, alpha, stage_rank, task_norm, target, dropout):
    from petah.plans import PlanConfig

    stages = {}
    for item in stage_rank or []:
        stage, sep, value = item.partition("=")
        if not sep or not stage.strip().isdigit() or not value.strip().isdigit():
            raise PetahError(f"--stage-rank wants STAGE=RANK (e.g. 0=0 to leave stage 0 unadapted), got {item!r}")
        stages[int(stage)] = int(value)
    return PlanConfig(preset=plan, rank=rank, alpha=alpha, stage_ranks=stages, task_norm=task_norm, targets=list(target or []), dropout=dropout)


def _score_table(title: str, column: str, scores: dict) -> Table:
    """One score per class; a class absent from the data has none (shown as -)."""
    table = Table(title=title)
    table.add_column("class")
    table.add_column(column, justify="right")
    for name, score in scores.items():
        table.add_row(name, "-" if score is None else f"{score:.3f}")
    return table


def _metrics_table(title: str, report: dict) -> Table:
    if "mAP" in report:  # detection
        return _score_table(f"{title}: mAP {report['mAP']:.4f}, mAP@.5 {report['mAP50']:.4f} on {report['samples']} images",
                            "AP", report["per_class_ap"])
    if "mIoU" in report:  # segmentation
        return _score_table(f"{title}: mIoU {report['mIoU']:.4f}, pixel accuracy {report['accuracy']:.4f} on {report['samples']} images",
                            "IoU", report["per_class_iou"])
    table = Table(title=f"{title}: accuracy {report['accuracy']:.4f} on {report['samples']} images")
    for col in ("class", "precision", "recall"):
        table.add_column(col, justify="right" if col != "class" else "left")
    for name, values in report["per_class"].items():
        table.add_row(name, f"{values['precision']:.3f}", f"{values['recall']:.3f}")
    return table


@app.command()
@training_options()
def adapt(
    backbone: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Package file to write (.petah).")],
    data: DataArg = None,
    data_opt: DataOpt = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Task name (default: the output file's stem).")] = None,
    task: Annotated[Optional[str], typer.Option("--task", help="classification | segmentation | detection (default: what DATA is labelled for).")] = None,
    dice: Annotated[bool, typer.Option("--dice", help="Segmentation: add a soft-dice term to the cross-entropy.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first bad sample instead of skipping it (dense data).")] = False,
    plan: PlanOpt = "petah",
    rank: RankOpt = 8,
    alpha: AlphaOpt = None,
    stage_rank: StageRankOpt = None,
    task_norm: TaskNormOpt = "none",
    target: TargetOpt = None,
    dropout: Annotated[float, typer.Option(help="LoRA dropout.")] = 0.0,
    head_lr: Annotated[Optional[float], typer.Option("--head-lr", help="Peak learning rate of the head (default: --lr).")] = None,
    adapter_dtype: Annotated[str, typer.Option("--adapter-dtype", help="Stored adapter precision: float16 | bfloat16 | float32.")] = "float16",
    confusion_png: Annotated[Optional[Path], typer.Option("--confusion-png", help="Write the confusion matrix as a PNG.")] = None,
    json_out: JsonOpt = False,
    training: TrainingArgs = None,
) -> None:
    """Step 2: train one task's adapters + head on a frozen backbone; write a .petah package."""
    import torch

    from petah import api
    from petah.data import load_dataset
    from petah.tasks import plot_confusion

    if adapter_dtype not in api.DTYPES:
        raise PetahError(f"--adapter-dtype must be one of {', '.join(api.DTYPES)}")
    plan_config = _plan(plan, rank, alpha, stage_rank, task_norm, target, dropout)
    torch.manual_seed(training.seed)
    bb = _backbone(backbone, training.weights, training.img_size)
    data = _data(data, data_opt)
    train, val = load_dataset(data, training.val_split, training.seed, strict)
    kind = _check_task(task, train, data)
    result = api.adapt(bb, train, val, plan_config, training.config(head_lr), name or output.stem, training.augment(), adapter_dtype, dice)
    api.save_package(result, output)
    if not is_main_process():  # under torchrun, rank 0 alone writes and reports
        return
    if confusion_png and kind.kind == "classification":
        plot_confusion(result.metrics, confusion_png, f"{name or output.stem} ({plan})")
    info = api.inspect_package(output)
    summary = {
        "package": str(output), "task": info["task"]["name"], "kind": kind.kind, "plan": plan,
        "accuracy": result.metrics["accuracy"], kind.primary_metric: result.metrics[kind.primary_metric],
        "skipped_samples": len(getattr(train, "skipped", [])),
        "package_bytes": info["package_bytes"], "backbone_bytes": info["backbone_bytes"], "ratio": info["ratio"],
        "train_seconds": round(result.train.seconds, 2), "images_per_second": round(result.train.images_per_second, 1),
        "metrics": result.metrics,
    }
    if json_out:
        emit_json(summary)
        return
    out.print(_metrics_table(summary["task"], result.metrics))
    out.print(f"wrote {output}: {info['package_bytes']:,} bytes = {100 * info['ratio']:.2f} % of the backbone; "
              f"trained {summary['train_seconds']:.1f} s")


@app.command("eval")
def eval_(
    package: Annotated[Path, typer.Argument(help="A .petah task package.")],
    backbone: BackboneOpt,
    data: DataArg = None,
    data_opt: DataOpt = None,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Evaluate on this held-out fraction.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the --val-split.")] = 0,
    confusion_png: Annotated[Optional[Path], typer.Option("--confusion-png", help="Write the confusion matrix as a PNG (classification).")] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Fail on the first bad sample instead of skipping it (dense data).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Evaluate a package on the validation part of DATA (classification: top-1, per-class precision /
    recall, confusion; segmentation: mIoU, per-class IoU, pixel accuracy; detection: mAP, mAP50,
    mAP75, per-class AP)."""
    from petah import api
    from petah.data import load_dataset
    from petah.tasks import plot_confusion

    bb = _backbone(backbone, weights, img_size)
    _train, val = load_dataset(_data(data, data_opt), val_split, seed, strict)
    _warn_skipped(val)
    report = api.evaluate(bb, package, val)
    if confusion_png and "confusion_matrix" in report:
        plot_confusion(report, confusion_png, package.stem)
    if json_out:
        emit_json({"package": str(package), "metrics": report})
    else:
        out.print(_metrics_table(package.stem, report))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    backbone: BackboneOpt,
    package: Annotated[list[Path], typer.Option("--package", "-p", help="A .petah package; repeat for several tasks.")],
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    top_k: Annotated[int, typer.Option("--top-k")] = 3,
    jsonl: Annotated[bool, typer.Option("--jsonl", help="One JSON line per image; a bad file gets an error line and the rest go on.")] = False,
    out_dir: Annotated[Path, typer.Option("--out-dir", help="Dense tasks: where mask PNGs and overlays (masks, boxes) go.")] = Path("predictions"),
    json_out: JsonOpt = False,
) -> None:
    """Run one or more task packages on images with one shared backbone (segmentation masks and
    mask / box overlays are written to --out-dir)."""
    from petah import api

    bb = _backbone(backbone, weights, img_size)
    if not jsonl:  # all or nothing: a bad file fails before any overlay is written
        from petah.data import load_image

        for path in api.image_files(images):
            load_image(path)
    entries = api.predict_files(bb, list(package), images, top_k=top_k, out_dir=out_dir)
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
    bad = next((e for e in entries if "error" in e), None)
    if bad is not None:
        raise PetahError(bad["error"])
    names = list(entries[0]["tasks"]) if entries else []
    if json_out:
        emit_json({"images": [e["image"] for e in entries], "tasks": {n: [e["tasks"][n] for e in entries] for n in names}})
        return
    table = Table(title="predictions")
    table.add_column("image")
    for name in names:
        table.add_column(name)
    for entry in entries:
        table.add_row(entry["image"], *[_describe(entry["tasks"][n]) for n in names])
    out.print(table)


def _describe(result: dict) -> str:
    if "label" in result:
        return f"{result['label']} ({result['score']:.2f})"
    if "boxes" in result:
        found = ", ".join(f"{b['label']} ({b['score']:.2f})" for b in result["boxes"][:5])
        return f"{len(result['boxes'])} boxes: {found}" if found else "no boxes"
    shares = ", ".join(f"{c} {100 * f:.1f}%" for c, f in sorted(result["pixels"].items(), key=lambda cf: -cf[1]))
    return shares + (f" → {result['mask']}" if "mask" in result else "")


@app.command()
def prune(
    backbone: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned backbone file to write (.safetensors).")],
    ratio: Annotated[float, typer.Option(help="Fraction of the channels of every prunable group to remove, in [0, 1).")] = 0.5,
    head_ratio: Annotated[Optional[float], typer.Option("--head-ratio", help="Fraction of attention heads to remove (default: --ratio).")] = None,
    data: Annotated[Optional[list[str]], typer.Option("--data", help="Images of a task the backbone serves (any DATA form); repeat for several tasks.")] = None,
    importance: Annotated[str, typer.Option(help="taylor (needs --data) | magnitude (data-free).")] = "taylor",
    calibration_batches: Annotated[int, typer.Option("--calibration-batches", help="Batches per task for Taylor importance.")] = 8,
    round_to: Annotated[Optional[int], typer.Option("--round-to", help="Keep channel counts multiples of this.")] = None,
    recover_epochs: Annotated[int, typer.Option("--recover-epochs", help="Epochs of feature distillation from the unpruned backbone.")] = 0,
    recover_lr: Annotated[float, typer.Option("--recover-lr", help="Learning rate of the recovery.")] = 5e-4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per step.")] = 32,
    seed: Annotated[int, typer.Option(help="Seed for data order.")] = 0,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Step 3: structurally prune the shared backbone (channels and heads) for the device; write a backbone file."""
    from petah import api
    from petah.data import load_dataset
    from petah.prune import PruneConfig

    if output.suffix != ".safetensors":
        raise PetahError(f"the pruned backbone is a .safetensors file, got {output}")
    config = PruneConfig(ratio=ratio, head_ratio=head_ratio, importance=importance, calibration_batches=calibration_batches,
                         round_to=round_to, recover_epochs=recover_epochs, recover_lr=recover_lr, batch_size=batch_size, seed=seed)
    bb = _backbone(backbone, weights, img_size)
    datasets = [load_dataset(spec, seed=seed)[0] for spec in data or []]
    pruned, report = api.prune_backbone(bb, config, datasets)
    api.save_pruned(pruned, report, output, command=_command_line())
    info = api.inspect_backbone(output)
    summary = {"backbone": str(output), **{k: info[k] for k in ("fingerprint", "params", "macs", "file_bytes")},
               "base": report["base"], "heads_removed": sum(report["heads_removed"].values()),
               "recovery": report["recovery"], "config": config.to_dict()}
    if json_out:
        emit_json(summary)
        return
    base = report["base"]
    out.print(f"wrote {output}: {info['params']:,} parameters ({100 * info['params'] / base['params']:.1f} % of {bb.name}), "
              f"{info['macs'] / 1e6:.1f} M MACs ({100 * info['macs'] / base['macs']:.1f} %), "
              f"{summary['heads_removed']} heads removed, {info['file_bytes']:,} bytes")


@app.command("inspect")
def inspect_(
    package: Annotated[Path, typer.Argument(help="A .petah task package, or a petah backbone file (.safetensors).")],
    json_out: JsonOpt = False,
) -> None:
    """Show a package's manifest and sizes, or a backbone file's parameters, MACs and size."""
    from petah import api

    if package.suffix == ".safetensors":
        return _inspect_backbone(package, json_out)
    info = api.inspect_package(package)
    if json_out:
        emit_json(info)
        return
    _print_fields(str(package), [
        ("task", f"{info['task']['name']} ({info['task']['kind']}, {len(info['task']['labels'])} classes)"),
        ("backbone", f"{info['backbone']}@{info['img_size']}px  {info['fingerprint'][:16]}"),
        ("plan", json.dumps(info["plan"])),
        ("adapted layers", str(info["adapted_layers"])),
        ("package", f"{info['package_bytes']:,} bytes"),
        ("backbone", f"{info['backbone_bytes']:,} bytes (fp32, no classifier)"),
        ("ratio", f"{100 * info['ratio']:.3f} %" if info["ratio"] else "?"),
        *[(k, str(info["metrics"][k])) for k in ("mIoU", "mAP", "mAP50") if k in info["metrics"]],
        ("accuracy", str(info["metrics"].get("accuracy"))),
        ("sections", ", ".join(f"{k}: {v['parameters']:,} params" for k, v in info["sections"].items())),
        ("created", f"{info['created_at']} by petah {info['petah_version']}"),
    ])


def _print_fields(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column field / value table (what `inspect` shows)."""
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    out.print(table)


def _inspect_backbone(path: Path, json_out: bool) -> None:
    from petah import api

    if not path.is_file():
        raise PetahError(f"backbone file not found: {path}")
    info = api.inspect_backbone(path)
    if json_out:
        emit_json(info)
        return
    pruning = info["pruning"]
    rows = [
        ("backbone", f"{'pruned ' if info['pruned'] else ''}{info['backbone']}@{info['img_size']}px  {info['fingerprint'][:16]}"),
        ("parameters", f"{info['params']:,}"),
        ("MACs", f"{info['macs']:,} per image"),
        ("file", f"{info['file_bytes']:,} bytes"),
        ("features", str(info["num_features"])),
    ]
    if pruning:
        base = pruning["base"]
        rows += [("pruned from", f"{base['fingerprint'][:16]}: {base['params']:,} parameters, {base['macs']:,} MACs"),
                 ("pruning", json.dumps(pruning["config"]))]
    _print_fields(str(path), rows)


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the demo's task packages.")] = Path("demo-out"),
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Cap each training run (a quick look; accuracy suffers).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Offline demo: adapt the bundled backbone to classification and segmentation tasks with two plans; print a table."""
    from petah.demo import run_demo

    rows = run_demo(output, max_steps=max_steps)
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


@app.command()
def export(
    packages: Annotated[list[Path], typer.Argument(help="One or more .petah task packages.")],
    backbone: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the ONNX files (<task>.onnx).")] = Path("export"),
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    parity_images: Annotated[Optional[list[Path]], typer.Option("--parity-image", help="Real images to check ONNX against PyTorch on (repeatable).")] = None,
    ort_adapters: Annotated[bool, typer.Option("--ort-adapters", help="One base.onnx for all tasks + one ONNX Runtime adapter file per task.")] = False,
    peft_dir: Annotated[Optional[Path], typer.Option("--peft", help="Write PEFT LoRA folders instead of ONNX: DIR for one package, DIR/<task> for several.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Export tasks: one merged ONNX model each, (--ort-adapters) one base + adapter files, or (--peft) PEFT folders."""
    from petah.data import Preprocess, load_image
    from petah.export import export_base_and_adapters, export_merged

    bb = _backbone(backbone, weights, img_size)
    if peft_dir is not None:
        _export_peft(bb, packages, peft_dir, json_out)
        return
    real = None
    if parity_images:
        real = Preprocess(bb.img_size, bb.mean, bb.std).batch([load_image(p) for p in parity_images])
    if ort_adapters:
        result = export_base_and_adapters(bb, list(packages), output, real).to_dict()
        if json_out:
            emit_json(result)
            return
        table = Table(title=f"{result['base']} ({result['base_bytes']:,} bytes) + ONNX Runtime adapters")
        for col in ("task", "adapter file", "bytes", "% of base", "max |onnx - torch|"):
            table.add_column(col)
        for r in result["tasks"]:
            table.add_row(r["task"], r["adapter"], f"{r['adapter_bytes']:,}", f"{r['percent_of_base']:.2f}", f"{r['max_abs_error']:.2e}")
        out.print(table)
        return
    results = [export_merged(bb, pkg, output / f"{pkg.stem}.onnx", real).to_dict() for pkg in packages]
    if json_out:
        emit_json({"exports": results})
        return
    table = Table(title=f"ONNX exports in {output}/ (opset 17, adapters merged)")
    for col in ("task", "file", "bytes", "max |onnx - torch|"):
        table.add_column(col)
    for r in results:
        table.add_row(r["task"], r["path"], f"{r['onnx_bytes']:,}", f"{r['max_abs_error']:.2e}")
    out.print(table)


def _export_peft(bb, packages: list[Path], folder: Path, json_out: bool) -> None:
    from petah.export.peft_interop import export_peft
    from petah.packages.format import read_package

    loaded = [read_package(p) for p in packages]
    names = [p.task_name for p in loaded]
    if len(set(names)) != len(names):
        raise PetahError(f"two packages share a task name ({', '.join(names)}); export them one at a time")
    results = [export_peft(bb, pkg, folder if len(loaded) == 1 else folder / pkg.task_name) for pkg in loaded]
    if json_out:
        emit_json({"exports": results})
        return
    table = Table(title="PEFT LoRA folders (load with PeftModel.from_pretrained on the timm model with its classifier)")
    for col in ("task", "folder", "adapter_model.safetensors bytes", "max |peft - petah|"):
        table.add_column(col)
    for r in results:
        table.add_row(r["task"], r["folder"], f"{r['files']['adapter_model.safetensors']:,}", f"{r['max_abs_error']:.2e}")
    out.print(table)


@app.command("import-peft")
def import_peft_cmd(
    folder: Annotated[Path, typer.Argument(help="A PEFT LoRA folder (adapter_config.json + adapter_model.safetensors).")],
    backbone: BackboneOpt,
    output: Annotated[Path, typer.Option("--output", "-o", help="The .petah package to write.")],
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    task: Annotated[Optional[str], typer.Option("--task", help="Task name (default: from the folder).")] = None,
    labels: Annotated[Optional[str], typer.Option("--labels", help="Comma-separated class names (default: from the folder, else 0..N-1).")] = None,
    adapter_dtype: Annotated[str, typer.Option("--adapter-dtype", help="Stored adapter precision: float16 | bfloat16 | float32.")] = "float16",
    json_out: JsonOpt = False,
) -> None:
    """Turn a PEFT LoRA folder trained on the same timm backbone into a .petah package."""
    from petah import api
    from petah.export.peft_interop import import_peft
    from petah.packages.format import write_package

    if adapter_dtype not in api.DTYPES:
        raise PetahError(f"--adapter-dtype must be one of {', '.join(api.DTYPES)}")
    bb = _backbone(backbone, weights, img_size)
    names = [x.strip() for x in labels.split(",")] if labels else None
    package, info = import_peft(bb, folder, task, names, api.DTYPES[adapter_dtype])
    path = write_package(output, package)
    info = {**info, "package": str(path), "package_bytes": path.stat().st_size}
    if json_out:
        emit_json(info)
        return
    out.print(f"[bold]{path}[/bold]: task {info['task']}, {info['lora_layers']} LoRA layers, "
              f"{len(info['owned_modules'])} owned modules, {info['classes']} classes, {info['package_bytes']:,} bytes; "
              f"max |petah - peft| {info['max_abs_error']:.2e}" + ("" if info["backbone_checked"] else
              " (the folder names no backbone fingerprint: make sure it was trained on these weights)"))


plan_app = typer.Typer(no_args_is_help=True, help="Adapter plans: what a task would adapt.")
app.add_typer(plan_app, name="plan")


@plan_app.command("show")
def plan_show(
    backbone: Annotated[str, typer.Argument(help="A petah backbone file, or a timm model name.")],
    plan: PlanOpt = "petah",
    rank: RankOpt = 8,
    alpha: AlphaOpt = None,
    stage_rank: StageRankOpt = None,
    task_norm: TaskNormOpt = "none",
    target: TargetOpt = None,
    classes: Annotated[int, typer.Option(help="Classes of the head counted in the trainable total.")] = 10,
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """List the layers a plan adapts on a backbone and the trainable parameters, before training."""
    from petah import api

    summary = api.plan_summary(_backbone(backbone, weights, img_size), _plan(plan, rank, alpha, stage_rank, task_norm, target, 0.0), classes)
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"plan {plan} on {summary['backbone']} @ {summary['img_size']} px (family: {summary['family'] or 'generic'})")
    for col in ("layer", "type", "method", "rank", "parameters"):
        table.add_column(col, justify="right" if col in ("rank", "parameters") else "left", overflow="fold")
    for layer in summary["layers"]:
        table.add_row(layer["module"], layer["type"], layer["method"], str(layer["rank"] or "-"), f"{layer['parameters']:,}")
    out.print(table)
    out.print(f"{len(summary['layers'])} adapted layers, {summary['adapter_parameters']:,} adapter + "
              f"{summary['owned_parameters']:,} owned ({summary['owned_tensors']} tensors) + {summary['head_parameters']:,} head "
              f"({summary['head_classes']} classes) parameters = {summary['trainable_percent']:.2f} % of the backbone's "
              f"{summary['backbone_parameters']:,}")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: side-by-side measurements in one run.")
app.add_typer(bench_app, name="bench")


@bench_app.command("latency")
def bench_latency(
    model: Annotated[str, typer.Option("--model", help="timm backbone name.")] = "efficientformerv2_s0",
    img_size: Annotated[int, typer.Option("--img-size")] = 224,
    batch: Annotated[int, typer.Option("--batch")] = 1,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats per variant (median reported).")] = 20,
    trunk_stages: Annotated[int, typer.Option("--trunk-stages", help="Leading stages the shared-trunk tasks leave unadapted.")] = 3,
    json_out: JsonOpt = False,
) -> None:
    """Plain vs unmerged vs merged (torch, ONNX, ORT adapters), shared trunk, task switching."""
    from petah.bench.latency import run_latency

    result = run_latency(model, img_size, batch, repeats, trunk_stages)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{model} @ {img_size}px, batch {batch}, {result['threads']} threads: median of {repeats}")
    table.add_column("variant")
    table.add_column("ms", justify="right")
    for key, value in result["latency_ms"].items():
        table.add_row(key, f"{value:.2f}")
    for key, value in result["switch_ms"].items():
        table.add_row(f"switch: {key}", f"{value:.3f}")
    for n, row in result["shared_trunk"].items():
        if n != "stages":
            table.add_row(f"{n} task(s): naive / shared trunk ({result['shared_trunk']['stages']} stages)",
                          f"{row['naive_s']:.1f} / {row['shared_s']:.1f} ({row['speedup']:.2f}x)")
    out.print(table)
    out.print(", ".join(f"{k} = {v}" for k, v in result["ratios"].items()))


@bench_app.command("prune")
def bench_prune(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for the JSON and the PNG plot.")] = Path("bench-prune"),
    ratios: Annotated[str, typer.Option(help="Comma-separated pruning ratios (0 is always included).")] = "0,0.25,0.5",
    backbone: Annotated[Optional[Path], typer.Option("--backbone", "-b", help="Backbone file (default: the demo's).")] = None,
    recover_epochs: Annotated[int, typer.Option("--recover-epochs", help="Feature distillation after pruning.")] = 3,
    repeats: Annotated[int, typer.Option(help="Interleaved ONNX Runtime repeats per ratio (median reported).")] = 50,
    structural: Annotated[str, typer.Option(help="Comma-separated timm models measured for size and latency only.")] = "efficientformer_l1",
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run: one task, a few steps, no recovery, no structural models.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Pruning ratio vs params, MACs, bytes, ONNX Runtime latency and demo-task accuracy after adaptation."""
    from petah.bench.prune import run_prune_bench
    from petah.demo import DEMO_TASKS
    from petah.prune import PruneConfig

    try:
        ratio_list = [float(r) for r in ratios.split(",") if r.strip()]
    except ValueError:
        raise PetahError(f"--ratios must be comma-separated numbers, got {ratios!r}") from None
    if backbone is not None and not backbone.is_file():
        raise PetahError(f"backbone file not found: {backbone}")
    models = tuple(m for m in structural.split(",") if m.strip())
    config = PruneConfig(recover_epochs=recover_epochs)
    tasks, max_steps = DEMO_TASKS, None
    if quick:
        config = PruneConfig(recover_epochs=0, calibration_batches=1, batch_size=16)
        tasks, max_steps, repeats, models = DEMO_TASKS[:1], 2, 5, ()
    result = run_prune_bench(output, ratio_list, backbone, tasks, config, repeats, max_steps, models)
    (output / "bench-prune.json").write_text(json.dumps(result, indent=2))
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"{result['backbone']}, ONNX Runtime CPU, {result['threads']} threads, median of {result['repeats']}")
    for col in ("ratio", "params", "MACs", "bytes", "ms", "speedup", "mean score", "loss (pts)"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(str(r["ratio"]), f"{r['params']:,}", f"{r['macs'] / 1e6:.1f} M", f"{r['backbone_bytes']:,}",
                      f"{r['ort_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['mean_score']:.4f}", f"{r['loss_points']:.2f}")
    out.print(table)
    for order, row in result["orders"].items():
        out.print(f"{order.replace('_', ' ')} at ratio {row['ratio']}: mean score {row['mean_score']:.4f}, "
                  f"{row['stored_bytes']:,} bytes stored for {len(row['tasks'])} task(s)")
    for name, rows in result["structural"].items():
        out.print(f"{name}: " + "; ".join(f"ratio {r['ratio']}: {r['params']:,} params, {r['macs'] / 1e6:.0f} M MACs, "
                                          f"{r['ort_ms']:.1f} ms ({r['speedup']:.2f}x)" for r in rows))
    out.print(f"plot: {result['plot']}")


@bench_app.command("methods")
def bench_methods(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder for JSON, markdown and PNG plots.")] = Path("bench-methods"),
    backbone: Annotated[Optional[Path], typer.Option("--backbone", "-b", help="Main backbone file (default: the demo's).")] = None,
    references: Annotated[str, typer.Option("--references", help="Comma-separated reference backbones the bench trains "
                                                               "itself; 'default' (with --full: all), 'all' (adds "
                                                               "efficientformer_l1) or 'none'.")] = "default",
    sources: Annotated[Optional[Path], typer.Option("--sources", help="Folder caching the trained reference sources "
                                                                       "(default: OUTPUT/sources).")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per method and task on the main backbone.")] = 3,
    full: Annotated[bool, typer.Option("--full", help="The whole grid: every backbone x every method x seeds, each "
                                                      "choosing its rate, bigger sources (a bigger machine's job).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A smoke run: one task, a few methods and steps, one tiny reference.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Adaptation methods side by side across backbones: accuracy, stored bytes, training speed, peak memory, latency."""
    from petah.bench.methods import markdown, plots, run_suite, suite
    from petah.demo import demo_backbone_path

    if backbone is not None and not backbone.is_file():
        raise PetahError(f"backbone file not found: {backbone}")
    if quick and full:
        raise PetahError("--quick and --full exclude each other")
    grids = suite("quick" if quick else "full" if full else "default", str(backbone or demo_backbone_path()), references, seeds)
    result = run_suite(grids, sources or output / "sources")
    output.mkdir(parents=True, exist_ok=True)
    result["plots"] = [str(p) for p in plots(result, output)]
    (output / "bench-methods.json").write_text(json.dumps(result, indent=1))
    (output / "bench-methods.md").write_text(markdown(result))
    if json_out:
        emit_json(result)
        return
    out.print(markdown(result))
    out.print(json.dumps({label: r["targets"] for label, r in result["backbones"].items()}, indent=1))


def main() -> None:
    try:
        code = app(standalone_mode=False)  # typer.Exit(n) comes back as n here
        if isinstance(code, int) and code:
            sys.exit(code)
    except PetahError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (run with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)
