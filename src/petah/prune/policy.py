"""``--policy auto``: per-stage pruning ratios chosen for the task set from a label-free probe.

For every stage and every ratio of ``RATIOS``, a copy of the backbone is pruned at that ratio in
that stage alone (magnitude importance: fast, no gradients) and measured twice:

- **distortion**: how much the stage maps the task heads read move on the tasks' own images —
  per task, the mean over stages of 1 - cosine(unpruned map, pruned map) per image; the tasks
  weigh equally (label-free: no head, no label is used);
- **saving**: the fraction of ONNX Runtime latency it saves, timed interleaved with the
  unpruned backbone on one image.

Then the combination of per-stage ratios with the largest summed saving whose summed distortion
stays within the budget is chosen (an exhaustive search: 4 ratios ^ 4 stages). The budget comes
from ``--max-loss`` (points of task metric) through ``POINTS_PER_DISTORTION``, measured on the
demo tasks (see docs/pruning.md): the proxy is a prediction, which the bench checks by adapting
every task. The probe stops at ``--policy-seconds``; stages it did not reach stay unpruned.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

RATIOS = (0.0, 0.25, 0.5, 0.75)
# points of mean task metric lost per unit of summed distortion, measured on the four demo tasks
# over 3 seeds (benchmarks/results/stage-ratio-prune-2026-12-01.json, docs/pruning.md): the choice
# the bench validated was made with 10.3 (from one uniform-0.5 run) and lost 1.65 points for a
# predicted 0.94 -> 18.1 at that choice's distortion; uniform 0.5 measured 4.3. The proxy is not
# linear: this takes the small-distortion value, where --max-loss budgets of a few points fall.
POINTS_PER_DISTORTION = 18.1


@dataclass
class Probe:
    stage: int
    ratio: float
    distortion: float
    saving: float  # fraction of the unpruned latency saved

    def to_dict(self) -> dict:
        return asdict(self)


def _cosine_distance(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per image: 1 - cosine between two (flattened) maps."""
    return 1 - nn.functional.cosine_similarity(reference.flatten(1), other.flatten(1), dim=1)


def distortion(reference: list[list[torch.Tensor]], model: nn.Module, images: list[torch.Tensor]) -> float:
    """Mean over tasks of the mean over stages and images of the distance between the unpruned and
    the pruned stage maps (through ``_readout`` where pruning changed a map's width)."""
    from petah.prune.pruner import stage_features

    with torch.no_grad():
        maps = [stage_features(model, x) for x in images]
    sizes = [len(x) for x in images]
    per_task = torch.zeros(len(images))
    stages = len(reference[0])
    for k in range(stages):
        ref = torch.cat([task_maps[k] for task_maps in reference])
        cur = torch.cat([task_maps[k] for task_maps in maps])
        if cur.shape == ref.shape:
            distance = _cosine_distance(ref, cur)
        else:  # what the readout cannot recover beyond its own estimation floor (the unpruned map read back)
            floor = _cosine_distance(ref, _readout(ref, ref))
            distance = (_cosine_distance(ref, _readout(cur, ref)) - floor).clamp_min(0)
        per_task += torch.stack([part.mean() for part in distance.split(sizes)]) / stages
    return per_task.mean().item()


def _readout(pruned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A pruned map has fewer channels: what its channels still carry of the reference, as a ridge
    readout fitted on every other image and applied to the rest (and the other way round), on the
    images of all tasks together, so that a small map (stage 3 at 64 px: 2 x 2) still has more
    pixels than channels. Fitted and scored on the same few images, that stage read back exactly
    and measured no distortion at any ratio."""
    mapped = torch.empty(reference.shape)
    for fit, apply in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        p = pruned[fit].permute(0, 2, 3, 1).reshape(-1, pruned.shape[1]).double()
        r = reference[fit].permute(0, 2, 3, 1).reshape(-1, reference.shape[1]).double()
        gram = p.T @ p
        ridge = 1e-3 * gram.trace() / gram.shape[0] + 1e-12
        weights = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), p.T @ r)
        mapped[apply] = (pruned[apply].permute(0, 2, 3, 1).double() @ weights).permute(0, 3, 1, 2).float()
    return mapped


def _latency(models: dict[str, nn.Module], x: torch.Tensor, repeats: int) -> dict[str, float]:
    from petah.export.timing import ort_medians
    from petah.runtime.onnx import to_onnx_bytes

    return ort_medians({k: to_onnx_bytes(m, x, k) for k, m in models.items()}, x.numpy(), repeats)


def probe_stages(model: nn.Module, stages: list[int], images: list[torch.Tensor], stage_of: Callable[[str], int],
                 seconds: float, repeats: int = 30) -> tuple[list[Probe], bool]:
    """Every (stage, ratio) probe within ``seconds``; returns them and whether all were measured."""
    from petah.prune.pruner import PruneConfig, prune_model, stage_features

    started = time.monotonic()
    reference = [stage_features(model, x) for x in images]
    example = images[0][:1]
    probes = []
    for stage, ratio in itertools.product(stages, RATIOS[1:]):
        if time.monotonic() - started > seconds:
            return probes, False
        pruned = copy.deepcopy(model)
        prune_model(pruned, example, PruneConfig(ratio=0.0, stage_ratios={stage: ratio}, importance="magnitude"),
                    stage_of=stage_of)
        times = _latency({"base": model, "pruned": pruned}, example, repeats)
        probes.append(Probe(stage, ratio, round(distortion(reference, pruned, images), 5),
                            round(1 - times["pruned"] / times["base"], 4)))
    return probes, True


def choose(probes: list[Probe], stages: list[int], budget: float) -> tuple[dict[int, float], float, float]:
    """The per-stage ratios with the largest summed saving within the distortion budget; returns
    them, their summed distortion and summed saving (additive predictions)."""
    table = {(p.stage, p.ratio): p for p in probes}
    options = [[0.0] + [r for r in RATIOS[1:] if (s, r) in table] for s in stages]
    best, best_saving, best_distortion = dict.fromkeys(stages, 0.0), 0.0, 0.0
    for combo in itertools.product(*options):
        chosen = [table[(s, r)] for s, r in zip(stages, combo, strict=True) if r > 0]
        total = sum(p.distortion for p in chosen)
        saving = sum(p.saving for p in chosen)
        if total <= budget + 1e-9 and saving > best_saving:  # sums of rounded probes
            best, best_saving, best_distortion = dict(zip(stages, combo, strict=True)), saving, total
    return best, best_distortion, best_saving


__all__ = ["POINTS_PER_DISTORTION", "RATIOS", "Probe", "choose", "distortion", "probe_stages"]
