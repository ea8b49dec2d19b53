"""Many tasks on one resident backbone (switching, merged mode, reload with rollback): the torch
runtime, and what the station reaches torch through on the full install (its backbones)."""

from petah.backbones import demo_backbone_path, resolve_backbone
from petah.runtime.runtime import MODES, PreparedTask, Runtime, RuntimeTask

__all__ = ["MODES", "PreparedTask", "Runtime", "RuntimeTask", "demo_backbone_path", "resolve_backbone"]
