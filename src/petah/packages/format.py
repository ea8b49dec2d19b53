"""The ``.petah`` task package: one safetensors file, tensors + a JSON manifest, never pickle.

Tensor names: ``adapter/<module>.lora_A|lora_B|scale_delta``, ``override/<backbone key>``,
``head/<key>``. The manifest records the format version, the backbone identity, the plan and
its resolved targets, labels, preprocessing, metrics and a sha256 of the tensor payload.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from petah import __version__
from petah.backbones import Backbone
from petah.backbones.weights import tensors_sha256
from petah.errors import PetahError
from petah.packages.atomic import atomic_write_bytes

FORMAT = "petah-task"
FORMAT_VERSION = 1
SECTIONS = ("adapter", "override", "head")


@dataclass
class TaskPackage:
    manifest: dict
    tensors: dict[str, torch.Tensor]  # "section/name" -> tensor

    def section(self, name: str) -> dict[str, torch.Tensor]:
        prefix = name + "/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def task_name(self) -> str:
        return self.manifest["task"]["name"]


def pack_tensors(adapters: dict, overrides: dict, head: dict, adapter_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Adapters may be stored in a smaller float type; overrides and head stay as trained."""
    out = {f"adapter/{k}": v.detach().cpu().to(adapter_dtype).contiguous() for k, v in adapters.items()}
    out.update({f"override/{k}": v.detach().cpu().contiguous() for k, v in overrides.items()})
    out.update({f"head/{k}": v.detach().cpu().contiguous() for k, v in head.items()})
    return out


def write_package(path: str | Path, package: TaskPackage) -> Path:
    """Write atomically; the manifest gets the payload hash and format version."""
    manifest = dict(package.manifest)
    manifest.update({"format": FORMAT, "format_version": FORMAT_VERSION, "petah_version": __version__})
    manifest["payload_sha256"] = tensors_sha256(package.tensors)
    payload = save(package.tensors, metadata={"format": FORMAT, "manifest": json.dumps(manifest)})
    package.manifest = manifest
    return atomic_write_bytes(Path(path), payload)


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PetahError(f"package not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError, Exception) as exc:  # noqa: B014 - any header error
        raise PetahError(f"{path} is not a readable petah package (truncated or corrupt): {str(exc).splitlines()[0]}") from exc
    if meta.get("format") != FORMAT or "manifest" not in meta:
        raise PetahError(f"{path} is not a petah task package (no petah manifest)")
    try:
        manifest = json.loads(meta["manifest"])
    except json.JSONDecodeError as exc:
        raise PetahError(f"{path}: the package manifest is not valid JSON") from exc
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PetahError(f"{path}: unknown package format version {version!r} (this petah reads {FORMAT_VERSION})")
    return manifest


def expected_tensor_names(manifest: dict) -> set[str]:
    names = set()
    for module, method, _rank in manifest["plan"]["targets"]:
        suffixes = ("lora_A", "lora_B") if method == "lora" else ("scale_delta",)
        names |= {f"adapter/{module}.{s}" for s in suffixes}
    names |= {f"override/{k}" for k in manifest["plan"]["overrides"]}
    names |= {f"head/{k}" for k in manifest["head"]["tensors"]}
    return names


def read_package(path: str | Path) -> TaskPackage:
    """Read and validate a package file (hash, version, completeness); never unpickles."""
    path = Path(path)
    manifest = read_manifest(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated data
        raise PetahError(f"{path} is truncated or corrupt: {str(exc).splitlines()[0]}") from exc
    if tensors_sha256(tensors) != manifest.get("payload_sha256"):
        raise PetahError(f"{path} is corrupt: the tensor payload does not match its sha256")
    missing = sorted(expected_tensor_names(manifest) - set(tensors))
    if missing:
        raise PetahError(f"{path} is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    return TaskPackage(manifest, tensors)


def check_backbone(manifest: dict, backbone: Backbone, origin: str = "package") -> None:
    """Refuse a package trained on another backbone, naming both."""
    want = manifest["backbone"]
    if (want["name"], int(want["img_size"]), want["fingerprint"]) != (backbone.name, backbone.img_size, backbone.fingerprint):
        pruned = "pruned " if want.get("pruned") else ""
        trained = f"{pruned}{want['name']}@{want['img_size']}px (fingerprint {want['fingerprint'][:12]})"
        raise PetahError(f"{origin} was trained on {trained}, but the backbone is {backbone.describe()}")
