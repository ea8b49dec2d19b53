"""What every verb group of the CLI shares: consoles, common options, JSON output, and the
derivation of command-line options from the config dataclasses (defined once, in the configs)."""

from __future__ import annotations

import functools
import inspect
import json
import shlex
import sys
import types
import typing
import warnings
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Annotated, Optional, Union

import typer
from rich.console import Console
from rich.table import Table

from petah.errors import PetahError, PetahWarning

out = Console()
err = Console(stderr=True)
STATE = {"debug": False}

JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")]
BackboneOpt = Annotated[str, typer.Option("--backbone", "-b", help="A petah backbone file, or a timm model name.")]
WeightsOpt = Annotated[str, typer.Option(
    help="Weights for a timm name: none | hub | FILE (.safetensors or torch state dict).")]
SizeOpt = Annotated[int | None, typer.Option("--img-size", help="Input size (fixed when the backbone is built).")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Fail on the first bad sample instead of skipping it "
                                                          "(dense data).")]
AdapterDtypeOpt = Annotated[str, typer.Option(
    "--adapter-dtype", help="Stored adapter precision: float16 | bfloat16 | float32 | int8 (LoRA factors in 8 bits "
                            "with a float32 scale per rank term: about half the bytes of float16).")]
_DATA_HELP = ("An image folder (class sub-folders; train/ + val/ or --val-split), a segmentation folder (images/ + "
              "masks/ + classes.txt), a COCO JSON (or a folder with annotations.json), or builtin:NAME.")
DataArg = Annotated[str | None, typer.Argument(help=_DATA_HELP, show_default=False)]
TrustOpt = Annotated[Path | None, typer.Option(
    "--trust", help="Folder of trusted public keys (*.pub): signed packages must verify against them; unsigned "
                    "ones load with a warning.")]
RequireSignedOpt = Annotated[bool, typer.Option(
    "--require-signed", help="Refuse every package not signed by a key in --trust.")]
DataOpt = Annotated[str | None, typer.Option("--data", help="The same as the DATA argument.", show_default=False)]
ValSplitOpt = Annotated[float | None, typer.Option("--val-split", help="Hold out this fraction for validation.")]
HflipOpt = Annotated[bool, typer.Option("--hflip", help="Random horizontal flips.")]
NoAugmentOpt = Annotated[bool, typer.Option("--no-augment", help="No augmentation.")]


def emit_json(payload: dict) -> None:
    sys.stdout.write(json.dumps(payload, default=str) + "\n")


def command_line() -> str:
    """How this run was invoked, recorded in the files it writes."""
    return "petah " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def backbone(spec: str, weights: str, img_size: int | None):
    from petah.api import resolve_backbone

    return resolve_backbone(spec, weights=weights, img_size=img_size)


def data_spec(argument: str | None, option: str | None) -> str:
    """DATA as an argument or as --data (one of them)."""
    if argument is not None and option is not None and argument != option:
        raise PetahError(f"two datasets given: {argument} and --data {option}")
    if argument is None and option is None:
        raise PetahError("no dataset given: pass DATA (or --data DATA)")
    return argument if argument is not None else option


def trust_policy(trust: Path | None, require_signed: bool, packages: list[Path] = ()):
    """--trust / --require-signed as a ``petah.packages.TrustPolicy`` (None: neither given), with
    every package in ``packages`` checked against it now: a refused package stops the command
    before any backbone or data loads and before anything is written (the library checks again as
    it reads them, and warns then: once)."""
    from petah.packages import TrustPolicy, read_trusted

    policy = TrustPolicy.from_options(trust, require_signed)
    if policy is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PetahWarning)
            for package in packages:
                read_trusted(package, policy)
    return policy


def augment(hflip: bool, no_augment: bool):
    from petah.data import Augment

    return None if no_augment else Augment(hflip=hflip)


def package_intensity(path: Path) -> str:
    """How the package's images deeper than 8 bits became 8-bit (its manifest; "dtype" before it said)."""
    from petah.packages.format import read_manifest

    return read_manifest(path).intensity


def warn_skipped(data) -> None:
    skipped = getattr(data, "skipped", [])
    if skipped:
        err.print(f"[yellow]warning:[/yellow] skipped {len(skipped)} bad sample(s) (--strict fails instead); "
                  f"first: {skipped[0]}", highlight=False, soft_wrap=True)  # one line, however long the path


def print_fields(title: str, rows: list[tuple[str, str]]) -> None:
    """A two-column field / value table (what `inspect` shows)."""
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value")
    for row in rows:
        table.add_row(*row)
    out.print(table)


# --- config fields -> typer options ---------------------------------------------------------
def cli_fields(cls: type, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ()) -> list:
    """The fields of config dataclass ``cls`` that have a command-line flag (metadata ``cli``)."""
    chosen = [f for f in fields(cls) if f.metadata.get("cli") and f.name not in exclude]
    return [f for f in chosen if only is None or f.name in only]


def _option_type(field, hint, default):
    """The type typer parses: the field's ``cli_type`` or its annotation, Optional when unset is allowed."""
    kind = field.metadata.get("cli_type") or hint
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (Union, types.UnionType) and type(None) in args:
        return Optional[next(a for a in args if a is not type(None))]  # typer reads typing.Optional  # noqa: UP045
    return Optional[kind] if default is None else kind  # noqa: UP045


def given_options(context: typer.Context, into: str) -> set[str]:
    """The fields of the config built as parameter ``into`` (``config_options``) that the running
    command was given on its command line: a default can then depend on what was not."""
    prefix = f"{into}__"
    return {name.removeprefix(prefix) for name in context.params if name.startswith(prefix)
            and context.get_parameter_source(name).name != "DEFAULT"}


def config_options(cls: type, into: str, *, only: tuple[str, ...] | None = None, exclude: tuple[str, ...] = (),
                   defaults: dict | None = None):
    """Give a command one option per CLI field of config dataclass ``cls`` (flag, help and default
    from the field's metadata; ``defaults`` overrides a default for this command); the command
    receives the built config as its parameter ``into``. The config validates itself, so a bad
    value is the same one-line ``PetahError`` on the command line as in the API. A field with a
    default factory (a list, a dict) is passed only when given, so the factory applies otherwise."""
    defaults = defaults or {}
    hints = typing.get_type_hints(cls)
    chosen = cli_fields(cls, only, exclude)
    unknown = set(defaults) - {f.name for f in chosen}
    if unknown:
        raise ValueError(f"defaults for fields that are not options: {sorted(unknown)}")
    params = []
    for f in chosen:
        default = defaults.get(f.name, None if f.default is MISSING else f.default)
        option = typer.Option(f.metadata["cli"], help=f.metadata["help"])
        params.append(inspect.Parameter(f"{into}__{f.name}", inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[_option_type(f, hints[f.name], default), option]))

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)  # real types: typer reads them
        own = [p for p in signature.parameters.values() if p.name != into]

        @functools.wraps(command)
        def wrapper(**kwargs):
            values = {}
            for f in chosen:
                value = kwargs.pop(f"{into}__{f.name}")
                if value is None and f.default is MISSING:
                    continue
                parse = f.metadata.get("parse")
                values[f.name] = parse(value) if parse else value
            return command(**{into: cls(**values)}, **kwargs)

        wrapper.__signature__ = signature.replace(parameters=own + params)
        wrapper.__annotations__ = {k: v for k, v in command.__annotations__.items() if k != into}
        return wrapper

    return decorate
