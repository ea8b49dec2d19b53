"""Backbones: timm creation, weight sources (hub, local file, none), fingerprint, files."""

from petah.backbones.factory import (
    Backbone,
    build_plain,
    create_backbone,
    fingerprint,
    read_backbone_metadata,
    resolve_backbone,
    save_backbone,
)

__all__ = ["Backbone", "build_plain", "create_backbone", "fingerprint", "read_backbone_metadata", "resolve_backbone",
           "save_backbone"]
