"""Adapter plans: one file per backbone family, looked up by timm model name."""

from petah.plans import efficientformer, efficientformer_v2, efficientvit, fastvit, mobilenet, mobilevit, resnet, vit
from petah.plans.base import (
    CHANNEL_SCALE,
    LAYOUT_OPTIONS,
    LORA,
    MAX_RANK,
    PRESETS,
    Family,
    PlanConfig,
    Target,
)

FAMILIES: tuple[Family, ...] = (
    efficientformer.FAMILY,
    efficientformer_v2.FAMILY,
    mobilevit.FAMILY,
    fastvit.FAMILY,
    fastvit.CONV_FAMILY,
    efficientvit.FAMILY,
    efficientvit.MSRA_FAMILY,
    mobilenet.FAMILY,
    resnet.FAMILY,
    vit.FAMILY,
)


def family_for(model_name: str) -> Family | None:
    """The family of a timm model name, or None when petah has no plan for it."""
    return next((f for f in FAMILIES if f.matches(model_name)), None)


def stage_function(model_name: str):
    """module name -> backbone stage for a timm model (0 for all where petah knows no family)."""
    family = family_for(model_name)
    return family.stage_of if family else (lambda _name: 0)


__all__ = [
    "CHANNEL_SCALE", "FAMILIES", "LAYOUT_OPTIONS", "LORA", "MAX_RANK", "PRESETS", "Family", "PlanConfig", "Target",
    "family_for", "stage_function",
]
