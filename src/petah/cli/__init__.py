"""The ``petah`` command line: parses, calls the library, prints. No logic the API lacks.

One module per verb group (``tasks``, ``deploy``, ``show``, ``bench``); each lists its verbs in
``COMMANDS``. ``common`` holds what they share, including the options derived from the configs.

The device verbs (serve, verify, inspect, sign, hub, …) are registered at once; the build verbs
(adapt, export, bench, …) are imported only when run, so ``petah serve`` never loads the training
stack, and on a device install a build verb answers one line saying it needs the full install.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import Annotated

import click
import typer
from typer.core import TyperGroup

from petah.cli import fleet, serve, show, sign
from petah.cli.common import STATE, emit_json, err
from petah.errors import PetahError, PetahWarning

# build verbs: name -> (module, attribute: a COMMANDS entry or a sub-app, one-line help for the list)
BUILD_VERBS = {
    "prepare": ("petah.cli.tasks", "COMMANDS", "Prepare the shared backbone once."),
    "adapt": ("petah.cli.tasks", "COMMANDS", "Adapt a task package on a backbone."),
    "eval": ("petah.cli.tasks", "COMMANDS", "Evaluate a task package on data."),
    "predict": ("petah.cli.tasks", "COMMANDS", "Predict image files with task packages."),
    "demo": ("petah.cli.tasks", "COMMANDS", "The offline demo: adapt, compare, serve-ready packages."),
    "export": ("petah.cli.deploy", "COMMANDS", "Export tasks (ONNX, PEFT) or a device backbone."),
    "import-peft": ("petah.cli.deploy", "COMMANDS", "Make a package from a PEFT LoRA folder."),
    "prune": ("petah.cli.deploy", "COMMANDS", "Prune the shared backbone."),
    "upgrade": ("petah.cli.deploy", "COMMANDS", "Rewrite a package in the current format."),
    "bench": ("petah.cli.bench", "bench_app", "Benchmarks: side-by-side measurements in one run."),
}
TRAINING_STACK = ("torch", "torchvision", "timm", "peft", "transformers", "torchmetrics", "matplotlib", "scipy",
                  "torch_pruning", "sklearn", "skimage", "mlxtend", "pycocotools", "onnxscript")


class LazyGroup(TyperGroup):
    """click's lazy-loading group: a build verb's module is imported when it is run (or its help shown)."""

    listing = False  # True while `petah --help` lists the verbs: they are listed without importing them

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(BUILD_VERBS))

    def format_help(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self.listing = False

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        command = super().get_command(ctx, name)
        if command is not None or name not in BUILD_VERBS:
            return command
        module_name, attribute, summary = BUILD_VERBS[name]
        if self.listing or ctx.resilient_parsing:
            return click.Command(name, short_help=summary, help=summary)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if (exc.name or "").split(".")[0] not in TRAINING_STACK:
                raise
            return _needs_full_install(name, summary, exc.name)
        target = getattr(module, attribute)
        if isinstance(target, typer.Typer):
            return typer.main.get_group(target)
        single = typer.Typer()
        single.command(name)(target[name])
        return typer.main.get_command(single)


def _needs_full_install(name: str, summary: str, missing: str) -> click.Command:
    def refuse(**_ignored) -> None:
        raise PetahError(f"petah {name} needs the full install (pip install 'petah[build]'): this device install "
                         f"has no {missing}")

    return click.Command(name, short_help=summary, callback=refuse, add_help_option=False,
                         context_settings={"ignore_unknown_options": True, "allow_extra_args": True})


app = typer.Typer(cls=LazyGroup, add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient task adaptation of hybrid vision transformers.")
for _group in (show, serve, sign, fleet):
    for _name, _command in _group.COMMANDS.items():
        app.command(_name)(_command)
app.add_typer(show.plan_app, name="plan")
app.add_typer(fleet.hub_app, name="hub")
app.add_typer(serve.capture_app, name="capture")


@app.callback()
def main_options(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False) -> None:
    STATE["debug"] = debug


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """petah's own warnings as one line on stderr (Python's format adds the source line)."""
    if issubclass(category, PetahWarning):
        err.print(f"[yellow]warning:[/yellow] {message}", highlight=False, soft_wrap=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


# options whose value may be left out (``--int8`` = ``--int8 always``; ``--int8 auto``): click has
# such options, typer does not pass them through, so a bare one gets its default value here
OPTIONAL_VALUES = {"--int8": ("always", ("always", "auto"))}


def with_optional_values(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if arg in OPTIONAL_VALUES:
            default, values = OPTIONAL_VALUES[arg]
            if i + 1 >= len(argv) or argv[i + 1] not in values:
                arg = f"{arg}={default}"
        out.append(arg)
    return out


def main() -> None:
    warnings.showwarning = _print_warning
    try:
        code = app(args=with_optional_values(sys.argv[1:]), standalone_mode=False)  # typer.Exit(n) comes back as n here
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
    except Exception as exc:  # click's usage errors and the like
        # matched by what they offer: typer >= 0.2x raises its own copy of click's classes
        if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
            err.print(f"[red]error:[/red] {exc.format_message()}", highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


__all__ = ["app", "emit_json", "main"]
