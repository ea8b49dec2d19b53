"""The ``petah`` command line: parses, calls the library, prints. No logic the API lacks."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from petah.errors import PetahError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Parameter-efficient task adaptation of hybrid vision transformers.")
out = Console()
err = Console(stderr=True)
STATE = {"debug": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="A petah backbone file, or a timm model name.")]
WeightsOpt = Annotated[str, typer.Option(help="Weights for a timm name: none | hub | FILE (.safetensors or torch state dict).")]
SizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Input size (fixed when the backbone is built).")]


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    STATE["debug"] = debug


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")


def _backbone(spec: str, weights: str, img_size: Optional[int]):
    from petah.backbones import create_backbone, read_backbone_metadata

    if Path(spec).suffix == ".safetensors" or read_backbone_metadata(spec):
        if not Path(spec).is_file():
            raise PetahError(f"backbone file not found: {spec}")
        return create_backbone(img_size=img_size, weights=spec)
    return create_backbone(spec, img_size, weights)


def _train_config(epochs, batch_size, lr, head_lr, seed, checkpoint_dir, checkpoint_every, resume, label_smoothing, max_steps, workers):
    from petah.train import TrainConfig

    return TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, head_lr=head_lr, seed=seed,
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, checkpoint_every=checkpoint_every,
        resume=resume, label_smoothing=label_smoothing, max_steps=max_steps, num_workers=workers,
    )


EpochsOpt = Annotated[int, typer.Option(help="Training epochs.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Images per step.")]
SeedOpt = Annotated[int, typer.Option(help="Seed for data order, augmentation and init.")]
CkptOpt = Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Write resumable checkpoints here.")]
CkptEveryOpt = Annotated[int, typer.Option("--checkpoint-every", help="Also checkpoint every N steps.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --checkpoint-dir.")]
SmoothOpt = Annotated[float, typer.Option("--label-smoothing")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Data loader worker processes.")]
ValSplitOpt = Annotated[Optional[float], typer.Option("--val-split", help="Hold out this fraction for validation.")]
DataArg = Annotated[str, typer.Argument(help="An image folder (class sub-folders; train/ + val/ or --val-split) or builtin:NAME.")]


def _augment(no_augment: bool, hflip: bool):
    from petah.data import Augment

    return None if no_augment else Augment(hflip=hflip)


@app.command()
def prepare(
    model: Annotated[str, typer.Argument(help="timm model name, e.g. efficientformerv2_s0.")],
    data: DataArg,
    output: Annotated[Path, typer.Option("--output", "-o", help="Backbone file to write (.safetensors).")],
    weights: WeightsOpt = "none",
    img_size: SizeOpt = None,
    epochs: EpochsOpt = 5,
    batch_size: BatchOpt = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate.")] = 2e-3,
    seed: SeedOpt = 0,
    val_split: ValSplitOpt = None,
    hflip: Annotated[bool, typer.Option("--hflip", help="Random horizontal flips.")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment")] = False,
    save_dtype: Annotated[str, typer.Option("--save-dtype", help="float32 | float16 | bfloat16")] = "float32",
    checkpoint_dir: CkptOpt = None,
    checkpoint_every: CkptEveryOpt = 0,
    resume: ResumeOpt = False,
    label_smoothing: SmoothOpt = 0.1,
    max_steps: MaxStepsOpt = None,
    workers: WorkersOpt = 0,
    json_out: JsonOpt = False,
) -> None:
    """Step 1: fully train (or fine-tune) a backbone on a source dataset; save it as a backbone file."""
    import torch

    from petah import api
    from petah.data import load_dataset

    if save_dtype not in api.DTYPES:
        raise PetahError(f"--save-dtype must be one of {', '.join(api.DTYPES)}")
    torch.manual_seed(seed)
    train, val = load_dataset(data, val_split, seed)
    config = _train_config(epochs, batch_size, lr, None, seed, checkpoint_dir, checkpoint_every, resume, label_smoothing, max_steps, workers)
    command = "petah " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    backbone, metrics = api.prepare(model, train, val, output, img_size, weights, config, _augment(no_augment, hflip), save_dtype, command)
    summary = {"backbone": backbone.name, "img_size": backbone.img_size, "fingerprint": backbone.fingerprint,
               "output": str(output), "output_bytes": output.stat().st_size, "accuracy": metrics["accuracy"]}
    if json_out:
        emit_json(summary)
    else:
        out.print(f"wrote {output} ({summary['output_bytes']:,} bytes): {backbone.describe()}, source accuracy {metrics['accuracy']:.4f}")


def main() -> None:
    try:
        app(standalone_mode=False)
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
