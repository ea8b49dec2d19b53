"""The ``petah`` command line: parses, calls the library, prints. No logic the API lacks.

One module per verb group (``tasks``, ``deploy``, ``show``, ``bench``); each lists its verbs in
``COMMANDS``. ``common`` holds what they share, including the options derived from the configs.
"""

from __future__ import annotations

import sys
import warnings
from typing import Annotated

import typer

from petah.cli import bench, deploy, fleet, serve, show, sign, tasks
from petah.cli.common import STATE, emit_json, err
from petah.errors import PetahError, PetahWarning

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Parameter-efficient task adaptation of hybrid vision transformers.")
for _group in (tasks, deploy, show, serve, sign, fleet):
    for _name, _command in _group.COMMANDS.items():
        app.command(_name)(_command)
app.add_typer(show.plan_app, name="plan")
app.add_typer(bench.bench_app, name="bench")
app.add_typer(fleet.hub_app, name="hub")


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
    except Exception as exc:  # click usage errors and the like
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)


__all__ = ["app", "emit_json", "main"]
