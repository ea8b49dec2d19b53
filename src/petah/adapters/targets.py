"""Plans meet models: which layers of a concrete torch model a plan config adapts (build side;
``plans.base`` holds what reading a plan needs, without torch)."""

from __future__ import annotations

import re

import torch.nn as nn

from petah.errors import PetahError
from petah.plans.base import CHANNEL_SCALE, LORA, PRESET_ROLES, Family, PlanConfig, Target, plain_name

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def is_grouped(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1


def is_adaptable(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, nn.Conv2d) or isinstance(module, (nn.Linear, nn.Conv2d))


def _generic_targets(model: nn.Module, modules: list, patterns: list[str], model_name: str) -> list:
    """Layers named by the user's regexes; each pattern must name at least one adaptable layer."""
    chosen = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise PetahError(f"--target {pattern!r} is not a valid regular expression: {exc}") from exc
        hits = [(n, m) for n, m in modules if regex.search(n)]
        if not hits:
            other = next(((n, m) for n, m in model.named_modules() if n and regex.search(n)), None)
            if other is None:
                raise PetahError(f"--target {pattern!r} matches no layer of {model_name}")
            raise PetahError(f"--target {pattern!r} matches {other[0]} ({type(other[1]).__name__}), which petah cannot "
                             "adapt: LoRA / channel scales go on Linear and Conv2d layers")
        chosen += [hit for hit in hits if hit not in chosen]
    return chosen


def resolve_targets(model: nn.Module, family: Family | None, config: PlanConfig, model_name: str) -> list[Target]:
    """Turn a plan config into the concrete list of adapted modules of ``model``.

    Refused here, before any training: a ``stage_ranks`` stage the backbone lacks. Capped here: a
    LoRA rank above a layer's smaller dimension (``min_dimension``) becomes that dimension, since
    a low-rank update of a layer can have no higher rank; the stored target records the capped rank.
    """
    modules = [(n, m) for n, m in model.named_modules() if is_adaptable(m)]
    _check_stages(modules, family, config, model_name)
    if config.preset not in PRESET_ROLES:
        return []
    if config.targets:
        chosen = _generic_targets(model, modules, config.targets, model_name)
    else:
        if family is None:
            raise PetahError(
                f"no adapter plan for {model_name}: petah knows no family for it; "
                "name the layers to adapt with --target REGEX (a generic plan)"
            )
        roles = PRESET_ROLES[config.preset]
        if config.preset == "attn-lora" and not family.has_attention:
            raise PetahError(f"plan attn-lora needs attention layers, but {model_name} ({family.name}) has none")
        role_res = [re.compile(family.roles[r]) for r in roles if r in family.roles]
        chosen = [(n, m) for n, m in modules if any(p.search(n) for p in role_res)]
        if config.preset == "petah":  # depthwise / grouped convs ride along with an exactly-mergeable scale
            chosen += [(n, m) for n, m in modules if is_grouped(m) and (n, m) not in chosen]
            chosen.sort(key=lambda nm: nm[0])
        if not chosen:
            raise PetahError(f"plan {config.preset} finds no layer to adapt in {model_name}")
    targets = []
    for name, module in chosen:
        stage = family.stage_of(name) if family else 0
        rank = config.stage_ranks.get(stage, config.rank)
        if rank == 0:
            continue
        if is_grouped(module):
            # depthwise: a scale per channel is the natural adapter; other grouped convs: PEFT
            # refuses LoRA on them unless rank % groups == 0 and cannot merge it.
            targets.append(Target(name, CHANNEL_SCALE, 0))
        else:
            targets.append(Target(name, LORA, min(rank, min_dimension(module))))
    return targets


def weight_matrix_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a layer's weight as the matrix a LoRA update B @ A changes."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels, module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    return module.out_features, module.in_features


def min_dimension(module: nn.Module) -> int:
    """The smaller side of a layer's weight as a matrix: the highest rank an update of it can have."""
    return min(weight_matrix_shape(module))


def _check_stages(modules: list, family: Family | None, config: PlanConfig, model_name: str) -> None:
    """A per-stage rank must name a stage the backbone has (else it would silently do nothing)."""
    if not config.stage_ranks:
        return
    stages = sorted({family.stage_of(n) if family else 0 for n, _ in modules})
    unknown = sorted(set(config.stage_ranks) - set(stages))
    if unknown:
        raise PetahError(f"--stage-rank {unknown[0]}={config.stage_ranks[unknown[0]]}: {model_name} has no stage "
                         f"{unknown[0]} (its stages: {', '.join(map(str, stages))})")


def override_names(model: nn.Module, config: PlanConfig) -> list[str]:
    """Backbone tensors a task replaces with its own copy (norms, biases, or everything)."""
    keys = sorted({n for n in map(plain_name, model.state_dict().keys()) if n})
    if config.preset == "full":
        return keys
    names: list[str] = []
    for module in config.override_modules:
        owned = [k for k in keys if k.startswith(module + ".")]
        if not owned:
            raise PetahError(f"the plan owns module {module!r}, which this backbone lacks or which holds no tensors")
        names += owned
    norm_affine = config.preset == "bitfit" or config.task_norm in ("affine", "stats")
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, NORM_TYPES):
            if norm_affine:
                names += [prefix + p for p, _ in module.named_parameters(recurse=False)]
            if config.task_norm == "stats" and isinstance(module, nn.modules.batchnorm._BatchNorm):
                names += [prefix + b for b, _ in module.named_buffers(recurse=False)]
        elif config.preset == "bitfit" and isinstance(module._parameters.get("bias"), nn.Parameter):
            names.append(prefix + "bias")
    return sorted({n for n in map(plain_name, names) if n})
