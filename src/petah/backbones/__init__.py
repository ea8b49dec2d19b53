"""Backbones: timm creation, weight sources (hub, local file, none), fingerprint, files."""

from importlib import resources
from pathlib import Path

from petah import DEMO_BACKBONE  # made by petah prepare: see assets/README.md
from petah.backbones.factory import (
    Backbone,
    build_plain,
    create_backbone,
    fingerprint,
    read_backbone_metadata,
    resolve_backbone,
    save_backbone,
)


def demo_backbone_path() -> Path:
    """The bundled demo backbone (the demo, the station's --demo and the benches use it)."""
    return Path(str(resources.files("petah") / "assets" / DEMO_BACKBONE))


__all__ = ["DEMO_BACKBONE", "Backbone", "build_plain", "create_backbone", "demo_backbone_path", "fingerprint",
           "read_backbone_metadata", "resolve_backbone", "save_backbone"]
