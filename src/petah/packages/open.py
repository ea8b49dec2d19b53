"""Open a package for a backbone: read, verify, check who signed it and which backbone it fits;
describe one. No torch: ``backbone`` is anything with the identity attributes (a torch
``Backbone`` on the build side, the device graph on a device)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from petah.errors import BackboneMismatch
from petah.packages.format import TaskPackage
from petah.packages.manifest import Manifest
from petah.packages.signing import TrustPolicy, read_trusted
from petah.plans import stage_function
from petah.plans.budget import stage_summary


class BackboneIdentity(Protocol):
    name: str
    img_size: int
    fingerprint: str

    def describe(self) -> str: ...


def check_backbone(manifest: Manifest, backbone: BackboneIdentity, origin: str = "package") -> None:
    """Refuse a package trained on another backbone, naming both."""
    want = manifest.backbone
    if (want.name, want.img_size, want.fingerprint) != (backbone.name, backbone.img_size, backbone.fingerprint):
        raise BackboneMismatch(f"{origin} was trained on {want.describe()}, but the backbone is {backbone.describe()}")


def open_package(package: TaskPackage | str | Path, backbone: BackboneIdentity, trust=None) -> tuple[TaskPackage, str]:
    """Read and verify a package (unless already read), check who signed it (``trust``, a
    ``TrustPolicy``) and that it fits ``backbone``; returns it and the name errors use for it."""
    package, origin = read_trusted(package, trust)
    check_backbone(package.manifest, backbone, origin)
    return package, origin


def describe_package(path: str | Path, trust: TrustPolicy | None = None) -> dict:
    """Manifest summary and sizes of a package file (verified as on load; with ``trust``, refused
    unless it accepts who signed it)."""
    path = Path(path)
    package, _origin = read_trusted(path, trust)
    manifest = package.manifest
    package_bytes = path.stat().st_size
    backbone_bytes = manifest.backbone.weights_bytes
    sections = {
        name: {"tensors": len(part), "parameters": sum(int(t.size) for t in part.values()),
               "bytes": sum(int(t.nbytes) for t in part.values())}
        for name in ("adapter", "override", "head")
        for part in [package.section(name)]
    }
    return {
        "package": str(path),
        "package_bytes": package_bytes,
        "backbone_bytes": backbone_bytes,
        "ratio": round(package_bytes / backbone_bytes, 6) if backbone_bytes else None,
        "backbone": manifest.backbone.name,
        "img_size": manifest.backbone.img_size,
        "fingerprint": manifest.backbone.fingerprint,
        "plan": manifest.plan.config,
        "adapted_layers": len(manifest.plan.targets),
        "stages": stage_summary(manifest.plan.targets, stage_function(manifest.backbone.name)),
        "task": manifest.task.to_dict(),
        "metrics": {k: v for k, v in manifest.metrics.items() if k in ("accuracy", "mIoU", "mAP", "mAP50", "samples")},
        "sections": sections,
        "adapter_dtype": manifest.adapter_dtype,
        "format_version": manifest.format_version,
        "content_sha256": manifest.content_sha256,
        "signature_present": bool(package.signature),
        "signature_verified": trust is not None and bool(package.signature),  # trust refuses one that fails
        "petah_version": manifest.petah_version,
        "created_at": manifest.created_at,
        "training": manifest.training,
    }
