"""``petah adapt --budget``: value every adapter choice with a short probe on the task's own data,
then spend the byte budget on the choices worth most per byte (``petah.plans.budget.allocate``).

The choices (the petah plan's layers, over-provisioned to ``--max-rank``):
- a LoRA layer's rank, one step per rank (0 = not adapted);
- a depthwise / grouped conv's channel scale (on or off);
- a norm layer the task owns (its affine, and for BatchNorm its statistics, trained on the task).

Two families of valuation, compared on the method bench (docs/benchmarks.md):
- ``gradient``: the head is warmed on the frozen backbone for a few steps, then the loss gradient
  of each layer's weight is summed over a few batches. A rank-r update can follow at most the top r
  singular directions of that gradient, so rank i is worth sigma_i^2, the squared gradient energy
  it captures (the first-order loss decrease of a unit step); a channel scale or norm layer is
  worth the squared norm of its own parameters' gradient. Needs labels; costs a few steps.
- ``activation`` (EVA-style, Paischer et al. 2024): the spectrum of each layer's inputs, rank i
  worth its explained-variance ratio. A 1x1 conv is a linear map over channels; a k x k conv a
  linear map over unfolded patches. No labels; channel scales always in (they are cheap), no norms.
  PEFT's own EVA refuses conv layers, which every EfficientFormerV2 target is.
"""

from __future__ import annotations

import copy
import itertools
import time
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch.utils.data import DataLoader

from petah.adapters.targets import NORM_TYPES, resolve_targets, weight_matrix_shape
from petah.errors import PetahError
from petah.packages.format import statistics_dtype
from petah.packages.quantized import QUANTIZED_DTYPES, scale_names
from petah.plans import CHANNEL_SCALE, LORA, PlanConfig, Target, stage_function
from petah.plans.base import MAGNITUDE
from petah.plans.budget import Ladder, allocate, stage_summary

# Probe length as a share of the training steps (the cap: +15 % of training time), with
# floors so a short run still sees a few batches and ceilings so a long one does not pay more.
HEAD_WARMUP = (0.06, 2, 40)  # share, fewest, most steps; each costs about a third of a training step
PROBE_BATCHES = (0.03, 1, 12)  # forward + backward (gradient) or forward only (activation)
NORM_FLOAT_BYTES = 4  # owned norm affines are stored as trained (fp32)


@dataclass
class Allocation:
    plan: PlanConfig  # the budget plan with the owned norm layers filled in
    targets: list[Target]
    report: dict


def _steps(share_floor_cap: tuple[float, int, int], total_steps: int) -> int:
    share, floor, cap = share_floor_cap
    return max(floor, min(cap, round(share * total_steps)))


def _entry_bytes(name: str) -> int:
    """What one stored tensor adds besides its numbers: its safetensors header entry and its
    name in the manifest (about; the exact size is checked on the built package)."""
    return 2 * len(name) + 90


class _Pricing:
    """Bytes of each choice as the package stores it (``adapter_dtype`` as the API names it)."""

    def __init__(self, adapter_dtype: str, dora: bool = False):
        self.quantized, self.dora = adapter_dtype in QUANTIZED_DTYPES, dora
        self.adapter = getattr(torch, adapter_dtype).itemsize
        self.channel = 2 if self.quantized else self.adapter  # int8 packages keep channel scales in fp16
        self.stats = 4 if statistics_dtype(adapter_dtype) == "float32" else 2

    def lora(self, target: Target, layer: nn.Module) -> tuple[int, int]:
        """(bytes of one rank, what the layer's first rank adds on top: its tensor entries)."""
        out_dim, in_dim = weight_matrix_shape(layer)
        names = [f"adapter/{target.module}.lora_A", f"adapter/{target.module}.lora_B"]
        per_rank = (out_dim + in_dim) * self.adapter
        first = 0
        if self.quantized:  # a float32 scale per rank term and factor
            names += [f"adapter/{name}" for name in scale_names(target.module)]
            per_rank += 2 * 4
        if self.dora:  # a float32 magnitude per output row
            names.append(f"adapter/{target.module}.{MAGNITUDE}")
            first += out_dim * 4
        return per_rank, first + sum(_entry_bytes(name) for name in names)

    def scale(self, target: Target, layer: nn.Module) -> int:
        return layer.out_channels * self.channel + _entry_bytes(f"adapter/{target.module}.scale_delta")

    def norm(self, name: str, module: nn.Module) -> int:
        cost = 0
        for key, tensor in itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            if key.startswith("running_"):
                size = self.stats
            elif tensor.is_floating_point():
                size = NORM_FLOAT_BYTES
            else:  # num_batches_tracked
                size = tensor.element_size()
            cost += tensor.numel() * size + _entry_bytes(f"override/{name}.{key}")
        return cost


def _batches(view, batch_size: int, seed: int, count: int):
    """``count`` shuffled batches, cycling through the data when it holds fewer."""
    loader = DataLoader(view, batch_size=batch_size, shuffle=True, collate_fn=getattr(view, "collate", None),
                        generator=torch.Generator().manual_seed(seed))
    produced = 0
    while produced < count:
        for batch in loader:
            yield batch
            produced += 1
            if produced >= count:
                return


def _all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Under torchrun every rank must choose the same plan: sum what the ranks measured."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor


def _norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Norm layers a task may own: those with an affine to train."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None}


def _gradient_gains(context, candidates: list[Target]) -> dict[str, list[float]]:
    from petah.train import Trainer
    from petah.train.trainer import to_device

    model, backbone_model, head = context.model, context.backbone_model, context.head
    warmup = _steps(HEAD_WARMUP, context.total_steps)
    config = replace(context.config, max_steps=warmup, progress=False, checkpoint_dir=None, resume=False,
                     checkpoint_every=0)
    Trainer(model, [], list(head.parameters()), context.loss_fn, context.view, config,
            set_train_mode=context.set_train_mode, unused_parameters=True).fit()
    norms = _norm_layers(backbone_model)
    watched = [backbone_model.get_submodule(t.module).weight for t in candidates]
    watched += [p for m in norms.values() for p in m.parameters(recurse=False)]
    watched += [backbone_model.get_submodule(t.module).bias for t in candidates
                if t.method == CHANNEL_SCALE and backbone_model.get_submodule(t.module).bias is not None]
    for tensor in watched:
        tensor.requires_grad_(True)
        tensor.grad = None
    try:
        context.set_train_mode(model)
        device = next(head.parameters()).device
        for images, targets in _batches(context.view, context.config.batch_size, context.config.seed + 1,
                                        _steps(PROBE_BATCHES, context.total_steps)):
            loss = context.loss_fn(model(images.to(device)), to_device(targets, device))
            loss.backward()
        gains: dict[str, list[float]] = {}
        for target in candidates:
            layer = backbone_model.get_submodule(target.module)
            grad = _all_reduce(layer.weight.grad.detach().clone())
            if target.method == LORA:
                sigma = torch.linalg.svdvals(grad.reshape(grad.shape[0], -1).float())
                gains[target.module] = (sigma[: target.rank] ** 2).tolist()
            else:  # d loss / d delta_c of the scale (1 + delta_c) on channel c
                energy = (layer.weight.detach() * grad).flatten(1).sum(1)
                if layer.bias is not None:
                    energy = energy + layer.bias.detach() * _all_reduce(layer.bias.grad.detach().clone())
                gains[target.module] = [float((energy ** 2).sum())]
        for name, module in norms.items():
            energy = sum(float((_all_reduce(p.grad.detach().clone()) ** 2).sum())
                         for p in module.parameters(recurse=False) if p.grad is not None)
            gains[name] = [energy]
    finally:
        for tensor in watched:
            tensor.requires_grad_(False)
            tensor.grad = None
        model.eval()
    return gains


def _layer_inputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A layer's input as rows of the vectors its weight matrix multiplies."""
    if isinstance(layer, nn.Conv2d):
        cols = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_moments(backbone_model: nn.Module, layers: dict[str, nn.Module], view, config, total_steps: int,
                  option: str, instead: str) -> dict[str, torch.Tensor]:
    """Each layer's input second moment X^T X, X's rows the vectors its weight multiplies (a
    conv's unfolded patches), over a few shuffled training batches through the frozen backbone in
    eval mode (inputs as inference sees them), summed over the ranks under torchrun. Where a conv
    cannot be unfolded, ``option`` is refused, suggesting ``instead``. A PEFT LoRA layer is watched
    as called (petah's inference forward never calls its base layer) and unfolded as its base layer."""
    moments: dict[str, torch.Tensor] = {}
    hooks = []
    for name, layer in layers.items():
        plain = layer.get_base_layer() if isinstance(layer, LoraLayer) else layer
        if isinstance(plain, nn.Conv2d) and not isinstance(plain.padding, tuple):  # "same" / "valid" strings
            raise PetahError(f"{option} cannot unfold {name} (padding {plain.padding!r}); use {instead}")

        def record(_module, args, _out, name=name, plain=plain):
            rows = _layer_inputs(plain, args[0].float())
            moment = rows.T @ rows
            moments[name] = moments[name] + moment if name in moments else moment
        hooks.append(layer.register_forward_hook(record))
    try:
        backbone_model.eval()
        device = next(backbone_model.parameters()).device
        for images, _ in _batches(view, config.batch_size, config.seed + 1, _steps(PROBE_BATCHES, total_steps)):
            backbone_model(images.to(device))
    finally:
        for hook in hooks:
            hook.remove()
    return {name: _all_reduce(moment) for name, moment in moments.items()}


def _activation_gains(context, candidates: list[Target]) -> dict[str, list[float]]:
    lora = [t for t in candidates if t.method == LORA]
    try:
        moments = input_moments(context.backbone_model,
                                {t.module: context.backbone_model.get_submodule(t.module) for t in lora},
                                context.view, context.config, context.total_steps, "--allocation activation",
                                "--allocation gradient")
    finally:
        context.model.eval()
    gains: dict[str, list[float]] = {}
    for target in lora:
        eigen = torch.linalg.eigvalsh(moments[target.module].double()).flip(0).clamp_min(0)
        gains[target.module] = (eigen[: target.rank] / eigen.sum().clamp_min(1e-30)).tolist()
    top = max((g[0] for g in gains.values() if g), default=1.0)
    for target in candidates:  # channel scales ride along, as in the uniform plan: first in line
        if target.method == CHANNEL_SCALE:
            gains[target.module] = [top * 10]
    return gains


@dataclass
class ProbeContext:
    """What the probes run on: the task model (backbone + fresh head) and its training data."""

    model: nn.Module
    backbone_model: nn.Module
    head: nn.Module
    loss_fn: object
    view: object
    config: object  # TrainConfig
    set_train_mode: object
    total_steps: int


def _ladders(context: ProbeContext, candidates: list[Target], gains: dict[str, list[float]],
             pricing: _Pricing) -> list[Ladder]:
    ladders = []
    model = context.backbone_model
    for target in candidates:
        layer = model.get_submodule(target.module)
        values = [max(g, 0.0) for g in gains.get(target.module, [])]
        if not values:
            continue
        if target.method == LORA:
            per_rank, first_extra = pricing.lora(target, layer)
            costs = (per_rank + first_extra,) + (per_rank,) * (len(values) - 1)
        else:
            costs = (pricing.scale(target, layer),)
        ladders.append(Ladder(target.module, tuple(values), costs))
    for name, module in _norm_layers(model).items():
        if name in gains:
            ladders.append(Ladder(name, (max(gains[name][0], 0.0),), (pricing.norm(name, module),)))
    return ladders


def allocate_budget(context: ProbeContext, plan: PlanConfig, backbone, budget: int, package_bytes,
                    adapter_dtype: str) -> Allocation:
    """Probe, then choose ranks, scales and owned norms whose package fits ``budget`` bytes.

    ``package_bytes(plan, targets)``: the exact bytes of the package these choices make (head,
    manifest and all) before training, plus room for what training adds to the manifest; the
    choice shrinks until it fits. The head is put back as it was, so training starts as without a
    budget. A budget the head and manifest alone exceed is refused before the probe.
    """
    started = time.monotonic()
    base = package_bytes(replace(plan, override_modules=[]), [])
    if base > budget:
        raise PetahError(f"--budget {plan.budget} is {budget:,} bytes, but this task's head and manifest alone "
                         f"take {base:,}: the smallest budget for it is {base:,} bytes")
    open_plan = replace(plan, rank=plan.max_rank, budget=None, override_modules=[])
    candidates = resolve_targets(backbone.model, backbone.family, open_plan, backbone.name)
    head_state = copy.deepcopy(context.head.state_dict())
    probe = _gradient_gains if plan.allocation == "gradient" else _activation_gains
    gains = probe(context, candidates)
    context.head.load_state_dict(head_state)
    probe_seconds = time.monotonic() - started
    ladders = _ladders(context, candidates, gains, _Pricing(adapter_dtype, plan.dora))
    by_name = {t.module: t for t in candidates}
    room = budget - base
    for _ in range(6):  # the prices are close, not exact: shrink by any excess and choose again
        taken, _spent = allocate(ladders, room)
        targets = sorted((replace(by_name[name], rank=count) if by_name[name].method == LORA else by_name[name]
                          for name, count in taken.items() if count and name in by_name), key=lambda t: t.module)
        owned = sorted(name for name, count in taken.items() if count and name not in by_name)
        chosen = replace(plan, override_modules=owned)
        total = package_bytes(chosen, targets)
        if total <= budget:
            break
        room -= total - budget
    else:
        raise PetahError(f"could not fit --budget {plan.budget} ({budget:,} bytes); the closest choice takes {total:,}")
    report = {
        "method": plan.allocation, "budget_bytes": budget, "planned_bytes": total,
        "probe_seconds": round(probe_seconds, 2), "seconds": round(time.monotonic() - started, 2),
        "lora_layers": f"{sum(t.method == LORA for t in targets)} of {sum(t.method == LORA for t in candidates)}",
        "channel_scales": sum(t.method == CHANNEL_SCALE for t in targets), "owned_norm_layers": len(owned),
        "stages": stage_summary(targets, stage_function(backbone.name)),
    }
    return Allocation(chosen, targets, report)
