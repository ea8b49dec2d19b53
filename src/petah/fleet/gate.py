"""The golden-set gate: a candidate package must score as well as the version it replaces on a
small labelled set kept on the device, and not run much slower.

``GOLDEN/<task>/`` holds the set in the task's usual format: class sub-folders (classification),
``images/`` + ``masks/`` (segmentation), a COCO JSON (detection) or ``good/`` + ``<defect>/``
folders with optional ``ground_truth/`` masks (anomaly) — all of it is the set.

Scoring runs where the station's engine runs: on a device backbone through the device engine
(``petah.device.golden``, no torch); on a torch backbone through the torch task models
(``petah.runtime.golden``, full install, imported only then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from petah.device import DeviceBackbone
from petah.device.golden import score_on_device


@dataclass
class Score:
    metric: str
    value: float  # in points (accuracy x 100, mIoU x 100, mAP50 x 100)
    seconds: float  # one pass over the golden set, from the median time of a batch
    fastest: float = 0.0  # one pass from each batch's fastest round (the cost without interference)


def score_versions(backbone, packages: dict[str, Path], golden: str | Path, engine=None) -> dict[str, Score] | None:
    """Each package scored on its task's golden set (None when there is none), and timed; a device
    backbone's through ``engine`` (the station's device engine)."""
    if isinstance(backbone, DeviceBackbone):
        scores = score_on_device(engine, packages, golden)
    else:
        from petah.runtime.golden import score_with_torch

        scores = score_with_torch(backbone, packages, golden)
    return None if scores is None else {name: Score(*row) for name, row in scores.items()}


@dataclass
class GateRule:
    tolerance: float = 1.0  # points the candidate may score below the current version
    max_slowdown: float = 1.2  # candidate latency / current latency

    def judge(self, candidate: Score, current: Score | None, min_score: float | None) -> str | None:
        """None when the candidate passes, else the one-line reason it does not."""
        if not math.isfinite(candidate.value):
            return f"{candidate.metric} is not a number on the golden set"
        if current is None:
            if min_score is not None and candidate.value < min_score:
                return f"{candidate.metric} {candidate.value:.2f} is below the release's minimum {min_score:.2f}"
            return None
        if candidate.value < current.value - self.tolerance:
            return (f"{candidate.metric} {candidate.value:.2f} vs {current.value:.2f} of the current version "
                    f"(tolerance {self.tolerance:g} points)")
        if candidate.seconds > self.max_slowdown * current.seconds:
            return (f"{candidate.seconds / current.seconds:.2f}x the current version's time on the golden set "
                    f"(at most {self.max_slowdown:g}x)")
        return None


__all__ = ["GateRule", "Score", "score_versions"]
