"""Config fields that carry their own help text and command-line name.

The config dataclasses (``PlanConfig``, ``TrainConfig``, ``PruneConfig``) are the one place an
option is defined: its default, its help, its ``--flag``. The CLI derives its options from them
(``petah.cli.common.config_options``), so the two cannot drift apart. Low in the tree on purpose:
it imports nothing from petah but ``petah.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, field, fields
from typing import Any

from petah.errors import PetahError


def option(default: Any = MISSING, *, help: str, cli: str | None = None, default_factory: Any = MISSING,
           cli_type: Any = None, parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with CLI metadata.

    ``cli``: the option's flag (e.g. ``"--batch-size"``); None keeps the field off the command line.
    ``cli_type`` / ``parse``: when the command line spells the value differently from the field
    (e.g. repeated ``STAGE=RANK`` strings for a dict), the type typer parses and how to convert it.
    """
    metadata = {"help": help, "cli": cli, "cli_type": cli_type, "parse": parse}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def require_positive(label: str, value: float | None) -> None:
    """The configs' one rule for rates and scales: unset (None) or a finite number > 0."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise PetahError(f"{label} must be a positive number, got {value}")


def parse_stage_values(items: list[str] | dict | None, flag: str, convert: Callable[[str], Any],
                       value_name: str, example: str) -> dict[int, Any]:
    """The CLI's repeated ``STAGE=VALUE`` (``["0=0", "3=16"]``) as ``{0: 0, 3: 16}``; a dict passes
    through (a config read back from JSON: keys become ints)."""
    if isinstance(items, dict):
        return {int(k): v for k, v in items.items()}
    stages = {}
    for item in items or []:
        stage, sep, value = item.partition("=")
        try:
            if not sep or not stage.strip().isdigit():
                raise ValueError
            stages[int(stage)] = convert(value.strip())
        except ValueError:
            raise PetahError(f"{flag} wants STAGE={value_name} (e.g. {example}), got {item!r}") from None
    return stages


def flag(cls: type, name: str) -> str:
    """How an error message names a field: its CLI flag where it has one (what CLI users typed),
    else the field name (what API users typed)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("cli") or name
    raise KeyError(name)


__all__ = ["flag", "option", "require_positive"]
