"""Structured pruning of the shared backbone (Torch-Pruning + hybrid attention pruners)."""

from petah.backbones.pruned import apply_changes, describe_changes
from petah.prune.pruner import IMPORTANCES, PruneConfig, prune_model, recover

__all__ = ["IMPORTANCES", "PruneConfig", "apply_changes", "describe_changes", "prune_model", "recover"]
