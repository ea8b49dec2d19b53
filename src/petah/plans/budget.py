"""Byte budgets for task packages: ``--budget`` parsing, the price of each adapter choice, and
the greedy allocation of a budget over choices whose gains diminish.

Users think in bytes (what ships to the device); a budget is ``3%`` (of the backbone's fp32
parameter bytes, the ``backbone_bytes`` petah reports), ``400KB`` / ``0.4MB`` (decimal units,
as file sizes are shown) or a plain number of bytes. How the gains are measured (a probe on the
task's data) is the build side's business (``petah.train.allocate``); this module is pure.
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass

from petah.errors import PetahError

_BUDGET = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|b|kb|mb|kib|mib)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {"b": 1, "kb": 1000, "mb": 1000**2, "kib": 1024, "mib": 1024**2}
BUDGET_FORMS = "3% (of the backbone's bytes), 400KB, 0.4MB or 250000 (bytes)"


def check_budget(text: str) -> str:
    """``text`` if it is a well-formed budget (checked before the backbone is known), else a one-line error."""
    found = _BUDGET.match(str(text))
    if found is None:
        raise PetahError(f"--budget {text!r} is not a budget; write {BUDGET_FORMS}")
    value, unit = float(found.group(1)), (found.group(2) or "b").lower()
    if not math.isfinite(value) or value <= 0:
        raise PetahError(f"--budget {text!r} must be more than zero")
    if unit == "%" and value > 100:
        raise PetahError(f"--budget {text!r}: a share of the backbone is at most 100%")
    return str(text).strip()


def budget_bytes(text: str, backbone_bytes: int) -> int:
    """The budget in bytes; a percentage is of ``backbone_bytes``."""
    found = _BUDGET.match(check_budget(text))
    value, unit = float(found.group(1)), (found.group(2) or "b").lower()
    if unit == "%":
        return int(backbone_bytes * value / 100)
    return int(value * _UNIT_BYTES[unit])


@dataclass(frozen=True)
class Ladder:
    """One adapter choice as steps taken in order: a layer's rank 1, 2, … (each step a rank more),
    or a single step (a channel scale, a norm layer the task owns). ``gains`` must not increase
    along the ladder (singular values come sorted), which is what makes greedy allocation sound."""

    name: str
    gains: tuple[float, ...]
    costs: tuple[int, ...]  # bytes of each step


def allocate(ladders: list[Ladder], budget: int) -> tuple[dict[str, int], int]:
    """How many steps of each ladder to take within ``budget`` bytes, by the highest gain per byte
    first (a step that no longer fits is skipped, cheaper ones may still go in; a step worth nothing
    is never bought, e.g. a layer the task's head never reads); and the bytes spent.

    For separable, diminishing gains this greedy rule is the knapsack's classic near-optimum: it is
    optimal up to the last step that did not fit.
    """
    taken = {ladder.name: 0 for ladder in ladders}
    heap = [(-ladder.gains[0] / max(ladder.costs[0], 1), index) for index, ladder in enumerate(ladders)
            if ladder.gains and ladder.gains[0] > 0]
    heapq.heapify(heap)
    spent = 0
    while heap:
        _, index = heapq.heappop(heap)
        ladder = ladders[index]
        step = taken[ladder.name]
        if spent + ladder.costs[step] > budget:
            continue  # this ladder stops here: its later steps are worth less per byte anyway
        spent += ladder.costs[step]
        taken[ladder.name] = step + 1
        if step + 1 < len(ladder.gains) and ladder.gains[step + 1] > 0:
            heapq.heappush(heap, (-ladder.gains[step + 1] / max(ladder.costs[step + 1], 1), index))
    return taken, spent


def stage_summary(targets, stage_of) -> dict[str, dict]:
    """Per backbone stage (keys as JSON has them): LoRA layers and their ranks, channel scales
    (``targets``: a plan's ``Target`` list)."""
    stages: dict[int, dict] = {}
    for target in targets:
        row = stages.setdefault(stage_of(target.module), {"lora_layers": 0, "rank_sum": 0, "rank_min": None,
                                                          "rank_max": None, "channel_scales": 0})
        if target.rank:
            row["lora_layers"] += 1
            row["rank_sum"] += target.rank
            row["rank_min"] = min(row["rank_min"] or target.rank, target.rank)
            row["rank_max"] = max(row["rank_max"] or 0, target.rank)
        else:
            row["channel_scales"] += 1
    return {str(stage): row for stage, row in sorted(stages.items())}
