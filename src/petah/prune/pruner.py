"""Structured pruning of a shared backbone with Torch-Pruning (DepGraph), hybrid-aware.

Channels: Torch-Pruning groups every set of coupled channels (a residual stream with its norms
and layer scales, an MLP's hidden width with its depthwise conv) and removes ``ratio`` of each
group. Attention blocks of the hybrid families are opaque to it (see ``attention.py``); their
heads are removed here first, at the same ratio unless told otherwise.

Importance: ``magnitude`` (data-free, L2 of the group's weights) or ``taylor`` (|weight x grad|,
with the gradient of every stage's feature energy on images of *all* the tasks the backbone
serves, each task weighted equally), so one pruned backbone keeps what each task uses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch_pruning as tp

from petah.errors import PetahError
from petah.options import option, parse_stage_values, require_positive
from petah.prune.attention import ATTENTION_PRUNERS, prune_all_heads, unsupported_attention

IMPORTANCES = ("magnitude", "taylor")
POLICIES = ("uniform", "auto")


@dataclass
class PruneConfig:
    """How a shared backbone is pruned; its fields are the options of ``petah prune``."""

    ratio: float = option(0.5, help="Fraction of the channels of every prunable group to remove, in [0, 1).",
                          cli="--ratio")
    head_ratio: float | None = option(None, help="Fraction of attention heads to remove (default: --ratio).",
                                      cli="--head-ratio")
    stage_ratios: dict[int, float] = option(
        default_factory=dict, help="STAGE=RATIO (repeatable): another ratio for one stage's channels and heads, "
                                   "e.g. 1=0 to keep the stride-8 maps a detection head reads.",
        cli="--stage-ratio", cli_type=list[str], parse=lambda items: parse_stage_ratios(items))
    importance: str = option("taylor", help="taylor (needs --data) | magnitude (data-free).", cli="--importance")
    policy: str = option("uniform", help="uniform (--ratio, --stage-ratio) | auto: per-stage ratios chosen for the "
                                         "tasks in --data by a label-free probe, within --max-loss.", cli="--policy")
    max_loss: float = option(1.0, help="--policy auto: the mean task-metric points the pruning may cost (predicted).",
                             cli="--max-loss")
    policy_seconds: float = option(300.0, help="--policy auto: time cap of the probe (stages not reached stay "
                                               "unpruned).", cli="--policy-seconds")
    calibration_batches: int = option(8, help="Batches per task for Taylor importance.", cli="--calibration-batches")
    round_to: int | None = option(None, help="Keep channel counts multiples of this (SIMD-friendly widths).",
                                  cli="--round-to")
    recover_epochs: int = option(0, help="Epochs of feature distillation from the unpruned backbone.",
                                 cli="--recover-epochs")
    recover_lr: float = option(5e-4, help="Learning rate of the recovery.", cli="--recover-lr")
    batch_size: int = option(32, help="Images per step.", cli="--batch-size")
    seed: int = option(0, help="Seed for data order.", cli="--seed")

    def __post_init__(self) -> None:
        self.stage_ratios = parse_stage_ratios(self.stage_ratios)
        for label, value in (("ratio", self.ratio), ("head ratio", self.head_ratio),
                             *((f"ratio of stage {k}", v) for k, v in self.stage_ratios.items())):
            if value is not None and not (0.0 <= float(value) < 1.0):
                raise PetahError(f"pruning {label} must be in [0, 1), got {value}")
        if self.policy not in POLICIES:
            raise PetahError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.policy == "auto" and self.stage_ratios:
            raise PetahError("--policy auto chooses every stage's ratio: leave out --stage-ratio")
        if not 0 < self.max_loss <= 100 or not 0 < self.policy_seconds <= 86400:
            raise PetahError("--max-loss must be in (0, 100] points and --policy-seconds in (0, 86400]")
        if self.importance not in IMPORTANCES:
            raise PetahError(f"unknown importance {self.importance!r}; choose from {', '.join(IMPORTANCES)}")
        if self.round_to is not None and self.round_to < 1:
            raise PetahError(f"--round-to must be at least 1, got {self.round_to}")
        if self.recover_epochs < 0 or self.calibration_batches < 1:
            raise PetahError("recovery epochs must be >= 0 and calibration batches >= 1")
        if self.batch_size < 1:
            raise PetahError(f"--batch-size must be at least 1, got {self.batch_size}")
        require_positive("--recover-lr", self.recover_lr)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["stage_ratios"] = {str(k): v for k, v in self.stage_ratios.items()}
        return data

    def stage_ratio(self, stage: int) -> float:
        return self.stage_ratios.get(stage, self.ratio)


def parse_stage_ratios(items: list[str] | dict | None) -> dict[int, float]:
    return {k: float(v) for k, v in parse_stage_values(items, "--stage-ratio", float, "RATIO", "1=0.25").items()}


def check_stage_ratios(model: nn.Module, config: PruneConfig, stage_of: Callable[[str], int], name: str) -> None:
    """Every --stage-ratio names a stage the backbone has (else it would silently do nothing)."""
    stages = sorted({stage_of(n) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)})
    unknown = sorted(set(config.stage_ratios) - set(stages))
    if unknown:
        raise PetahError(f"--stage-ratio {unknown[0]}={config.stage_ratios[unknown[0]]:g}: {name} has no stage "
                         f"{unknown[0]} (its stages: {', '.join(map(str, stages))})")


def check_prunable(model: nn.Module) -> None:
    """A family petah cannot prune is refused before anything changes, naming the layer."""
    found = unsupported_attention(model)
    if found is not None:
        name, module = found
        raise PetahError(
            f"petah cannot prune {type(model).__name__}: layer {name} ({type(module).__name__}) has attention "
            "heads without a pruner (supported: EfficientFormer, EfficientFormerV2 and convolution-only models)"
        )


def stage_features(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every stage's output map: what dense heads and the pooled classifier features are built from."""
    return model.forward_intermediates(images, intermediates_only=True)


def _feature_energy(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Sum over stages of mean squared activation, each stage scaled to 1 (so none dominates)."""
    loss = images.new_zeros(())
    for feature in stage_features(model, images):
        energy = feature.pow(2).mean()
        loss = loss + energy / energy.detach().clamp_min(1e-12)
    return loss


def round_robin(loaders: list[Iterable], batches_per_task: int | None = None) -> Iterator[torch.Tensor]:
    """Image batches from several tasks in turn (one from each), so every task counts equally."""
    iterators = [iter(loader) for loader in loaders]
    count = 0
    while iterators and (batches_per_task is None or count < batches_per_task):
        alive = []
        for it in iterators:
            batch = next(it, None)
            if batch is not None:
                alive.append(it)
                yield batch[0]
        iterators = alive
        count += 1


def accumulate_taylor_gradients(model: nn.Module, loaders: list[Iterable], batches_per_task: int) -> int:
    """Gradients of the feature energy on every task's images, summed into ``.grad``; returns images seen."""
    model.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    seen = 0
    for images in round_robin(loaders, batches_per_task):
        model.eval()  # fixed BN statistics; also clears V2's eval-mode bias cache before each backward
        _feature_energy(model, images).backward()
        seen += images.shape[0]
    return seen


def _layer_scale_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]]:
    """Parameters outside any layer Torch-Pruning knows (timm's layer-scale gammas): channel dim 0."""
    known = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, *ATTENTION_PRUNERS)
    wrapped = {id(p) for m in model.modules() if isinstance(m, known) for p in m.parameters()}
    return [(p, 0) for p in model.parameters() if id(p) not in wrapped and p.ndim == 1]


def refresh_widths(model: nn.Module, example: torch.Tensor) -> None:
    """Update timm's model-level widths (num_features, head_hidden_size, feature_info) after pruning."""
    with torch.no_grad():
        maps = stage_features(model, example)
        for info, feature in zip(getattr(model, "feature_info", []), maps, strict=False):
            info["num_chs"] = int(feature.shape[1])
        features = model.forward_features(example)
        width = int(features.shape[1] if features.ndim == 4 else features.shape[-1])
        pooled = model.forward_head(features, pre_logits=True)
    if isinstance(getattr(model, "num_features", None), int):
        model.num_features = width
    if isinstance(getattr(model, "head_hidden_size", None), int):
        model.head_hidden_size = int(pooled.shape[-1])


def prune_model(model: nn.Module, example: torch.Tensor, config: PruneConfig,
                loaders: list[Iterable] | None = None, stage_of: Callable[[str], int] = lambda name: 0) -> dict:
    """Prune ``model`` in place; returns what was removed. ``loaders`` yield image batches (Taylor);
    ``stage_of`` maps a module name to its stage (the family's), for ``config.stage_ratios``."""
    check_prunable(model)
    check_stage_ratios(model, config, stage_of, type(model).__name__)
    taylor = config.importance == "taylor"
    if taylor and not loaders:
        raise PetahError("taylor importance needs images: give --data (repeat it per task), "
                         "or use --importance magnitude")
    if config.recover_epochs and not loaders:
        raise PetahError("recovery distils on images: give --data, or set recover epochs to 0")
    model.eval().requires_grad_(True)  # Torch-Pruning traces the autograd graph: frozen weights would not appear
    report: dict = {"heads_removed": {}, "images_seen": 0}
    if taylor:
        report["images_seen"] = accumulate_taylor_gradients(model, loaders, config.calibration_batches)
    def head_ratio(name: str) -> float:
        return config.stage_ratio(stage_of(name)) if config.head_ratio is None else config.head_ratio

    report["heads_removed"] = prune_all_heads(model, head_ratio, taylor)
    # per-stage ratios: Torch-Pruning takes a ratio per layer; a group's ratio is its root layer's
    per_layer = {m: config.stage_ratios[stage_of(n)] for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d | nn.Linear) and stage_of(n) in config.stage_ratios}
    if config.ratio > 0 or any(per_layer.values()):
        importance = tp.importance.GroupTaylorImportance() if taylor else tp.importance.GroupMagnitudeImportance(p=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Torch-Pruning warns about recursion depth in shape inference
            pruner = tp.pruner.BasePruner(
                model, example, importance=importance, pruning_ratio=config.ratio, pruning_ratio_dict=per_layer or None,
                round_to=config.round_to,
                customized_pruners=dict(ATTENTION_PRUNERS), unwrapped_parameters=_layer_scale_parameters(model),
            )
            pruner.step()
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False).eval()
    refresh_widths(model, example)
    return report


def recover(student: nn.Module, teacher: nn.Module, loaders: list[Iterable], config: PruneConfig,
            example: torch.Tensor) -> dict:
    """Short distillation: the pruned backbone learns to reproduce the unpruned one's stage features.

    Channel counts differ after pruning, so a 1x1 projection per stage (dropped afterwards) maps
    the student's maps onto the teacher's; the loss is their MSE over the teacher's energy.
    """
    if config.recover_epochs <= 0:
        return {}
    teacher.eval().requires_grad_(False)
    with torch.no_grad():
        pairs = list(zip(stage_features(student, example), stage_features(teacher, example), strict=True))
    projections = nn.ModuleList(nn.Conv2d(s.shape[1], t.shape[1], 1) for s, t in pairs)
    student.requires_grad_(True).train()
    params = list(student.parameters()) + list(projections.parameters())
    steps = config.recover_epochs * sum(len(loader) for loader in loaders)
    optimizer = torch.optim.AdamW(params, lr=config.recover_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    first = last = None
    for _ in range(config.recover_epochs):
        for images in round_robin(loaders):
            with torch.no_grad():
                targets = stage_features(teacher, images)
            loss = sum(
                (proj(s) - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12)
                for proj, s, t in zip(projections, stage_features(student, images), targets, strict=True)
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            last = float(loss.detach())
            first = last if first is None else first
    student.zero_grad(set_to_none=True)
    student.requires_grad_(False).eval()
    return {"epochs": config.recover_epochs, "steps": steps, "first_loss": first, "last_loss": last}


__all__ = ["IMPORTANCES", "PruneConfig", "check_prunable", "prune_model", "recover", "refresh_widths",
           "round_robin"]
