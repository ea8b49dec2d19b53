"""Which tasks the device engine holds merged and which on the shared base, within a memory budget.

Merged, a task answers fastest but holds a backbone's worth of weights of its own; on the shared
base it holds about its package (its adapters beside one shared graph of the backbone) and answers
about 2x slower on the demo backbone (docs/deploy.md, "How a task is held"). So the busiest tasks
are held merged while they fit the budget, the rest on the base; traffic is counted with a decay,
so the choice follows the line's work as it changes."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

HALF_LIFE_S = 30.0  # traffic from this long ago counts half
SWITCH_MARGIN = 1.25  # a task takes a merged task's place only when this much busier: no flapping


class Traffic:
    """Images answered per task, decayed exponentially (a rate-like score)."""

    def __init__(self, half_life_s: float = HALF_LIFE_S, clock=time.monotonic):
        self.half_life_s = half_life_s
        self.clock = clock
        self.counts: dict[str, float] = {}
        self.when = clock()

    def _decay(self) -> None:
        now = self.clock()
        factor = math.pow(0.5, (now - self.when) / self.half_life_s)
        self.when = now
        for name in self.counts:
            self.counts[name] *= factor

    def add(self, name: str, images: int) -> None:
        self._decay()
        self.counts[name] = self.counts.get(name, 0.0) + images

    def scores(self) -> dict[str, float]:
        self._decay()
        return dict(self.counts)

    def forget(self, name: str) -> None:
        self.counts.pop(name, None)


@dataclass(frozen=True)
class Holding:
    """What one task costs in each form (bytes of weights held) and how busy it is."""

    name: str
    merged_bytes: int  # its merged graph's own weights
    base_bytes: int | None  # its adapters and head on the shared base; None: it cannot be held there
    traffic: float = 0.0
    merged_now: bool = False


def plan_merged(tasks: list[Holding], budget_bytes: float, base_graph_bytes: int) -> set[str]:
    """The tasks to hold merged: those that cannot be held on the base, then the busiest while the
    total (merged graphs, every task's base form, the shared base graph while any task uses it)
    fits the budget. A merged task keeps its place unless another is SWITCH_MARGIN times busier."""
    merged = {t.name for t in tasks if t.base_bytes is None}
    total = sum(t.merged_bytes for t in tasks if t.base_bytes is None)
    total += sum(t.base_bytes for t in tasks if t.base_bytes is not None)
    on_base = [t for t in tasks if t.base_bytes is not None]
    on_base.sort(key=lambda t: (-(t.traffic * (SWITCH_MARGIN if t.merged_now else 1.0)), not t.merged_now, t.name))
    remaining = len(on_base)
    for task in on_base:
        after = total + task.merged_bytes
        if after + (base_graph_bytes if remaining > 1 else 0) > budget_bytes:
            continue  # a smaller task further down may still fit
        merged.add(task.name)
        total = after
        remaining -= 1
    return merged


__all__ = ["HALF_LIFE_S", "SWITCH_MARGIN", "Holding", "Traffic", "plan_merged"]
