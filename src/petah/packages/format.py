"""The ``.petah`` file: one safetensors file holding tensors, a JSON manifest and a signature slot.

Never pickle. Tensor names: ``adapter/<module>.lora_A|lora_B|scale_delta``, ``override/<backbone
key>``, ``head/<key>``. Format v2 stores in the safetensors header metadata ``format`` (the string
``petah-task``), ``manifest`` (canonical JSON with the *content hash*) and ``signature`` (empty, or
signatures of the content hash; outside what is hashed, so signing never rewrites hashed bytes).
The content hash is sha256 over the canonical manifest (every field but the hash) and then every
tensor in sorted name order; ``docs/format.md`` gives the byte-exact definition.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from petah import __version__
from petah.errors import PetahError, PetahWarning
from petah.files import atomic_write_bytes
from petah.packages.manifest import (
    CURRENT_VERSIONS,
    FORMAT,
    FORMAT_VERSION,
    HASH_FIELD,
    V1_HASH_FIELD,
    Manifest,
    canonical_json,
)
from petah.packages.tensors import dtype_names, raw_bytes, tensors_sha256

SECTIONS = ("adapter", "override", "head")
MAX_MANIFEST_CHARS = 32 * 2**20  # 100,000 labels of 200 characters fit; a larger header is not a manifest
SIGNATURE_KEY = "signature"
HEADER_KEYS = ("format", "manifest", SIGNATURE_KEY)


@dataclass
class TaskPackage:
    manifest: Manifest
    tensors: dict[str, np.ndarray]  # "section/name" -> array (the torch side converts: petah.backbones.tensors)
    signature: str = ""  # the header's signature slot, as stored (empty: unsigned)

    def section(self, name: str) -> dict[str, np.ndarray]:
        prefix = name + "/"
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def task_name(self) -> str:
        return self.manifest.task.name


NORM_STATISTICS = ("running_mean", "running_var")  # BatchNorm buffers a task owns with task_norm="stats"


def statistics_dtype(adapter_dtype: str) -> str:
    """How owned norm statistics are stored: fp16 unless adapters are fp32 (measured, docs/format.md)."""
    return "float32" if adapter_dtype == "float32" else "float16"


def content_sha256(manifest: dict, tensors: dict[str, np.ndarray]) -> str:
    """sha256(canonical manifest without its hash + "\\n", then per tensor in sorted name order:
    its canonical {"dtype", "name", "shape"} JSON + "\\n" and its raw little-endian bytes)."""
    hashed = {k: v for k, v in manifest.items() if k != HASH_FIELD}
    digest = hashlib.sha256(canonical_json(hashed) + b"\n")
    for name in sorted(tensors):
        tensor = tensors[name]
        dtype = getattr(tensor, "dtype", None)
        names = dtype_names(dtype.newbyteorder("=")) if isinstance(tensor, np.ndarray) else None
        if names is None:
            raise PetahError(f"tensor {name} has dtype {dtype}, which a package cannot store")
        header = {"dtype": names[0], "name": name,
                  "shape": [int(n) for n in tensor.shape]}
        digest.update(canonical_json(header) + b"\n")
        digest.update(raw_bytes(tensor))
    return digest.hexdigest()


def content_matches(package: TaskPackage) -> bool:
    """Whether a package's manifest and tensors still match its content hash (format 1 has none)."""
    manifest = package.manifest
    return manifest.format_version == 1 or content_sha256(manifest.to_dict(with_hash=False),
                                                          package.tensors) == manifest.content_sha256


def signed_message(content_hash: str) -> bytes:
    """The bytes a package signature signs: a fixed context string and the content hash (hex)."""
    return b"petah-package-signature-v1:" + content_hash.encode("ascii")


def encode_package(package: TaskPackage) -> bytes:
    """The file's bytes; the manifest is stamped with this format version and its content hash.
    What a reader would refuse is refused here, so nothing unreadable is ever written."""
    manifest = package.manifest
    manifest.format_version, manifest.petah_version = manifest.written_version(), __version__
    Manifest.from_dict(manifest.to_dict(with_hash=False), f"package {manifest.task.name}")
    manifest.content_sha256 = content_sha256(manifest.to_dict(with_hash=False), package.tensors)
    header = {"format": FORMAT, "manifest": canonical_json(manifest.to_dict()).decode(),
              SIGNATURE_KEY: package.signature}
    return save(_contiguous(package.tensors), metadata=header)


def _contiguous(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: np.require(v, requirements="C") for k, v in tensors.items()}


def write_package(path: str | Path, package: TaskPackage) -> Path:
    """Write atomically (temp file, then rename)."""
    return atomic_write_bytes(Path(path), encode_package(package))


def _header(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise PetahError(f"package not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as handle:
            return handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a bad header
        raise PetahError(f"{path} is not a readable petah package (truncated or corrupt): "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def _raw_manifest(path: Path, header: dict[str, str]) -> dict:
    if header.get("format") != FORMAT or "manifest" not in header:
        raise PetahError(f"{path} is not a petah task package (no petah manifest)")
    text = header["manifest"]
    if len(text) > MAX_MANIFEST_CHARS:
        raise PetahError(f"{path}: the package manifest is over {MAX_MANIFEST_CHARS // 2**20} MiB")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, over-long integers, deep nesting
        raise PetahError(f"{path}: the package manifest is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(raw, dict):
        raise PetahError(f"{path}: the package manifest must be a JSON object, got {type(raw).__name__}")
    if raw.get("format_version") != 1:  # v2 stores exactly the canonical form it hashes: one reading for all readers
        try:
            canonical = canonical_json(raw).decode() == text
        except (PetahError, RecursionError, UnicodeError):
            canonical = False
        if not canonical:
            raise PetahError(f"{path}: the package manifest is not in canonical form (sorted keys, no whitespace, "
                             "no duplicate keys, no NaN: docs/format.md)")
    return raw


def read_manifest(path: str | Path) -> Manifest:
    """The typed manifest alone (structure validated, hash not checked: use ``read_package`` to trust it)."""
    path = Path(path)
    return Manifest.from_dict(_raw_manifest(path, _header(path)), str(path))


def read_package(path: str | Path) -> TaskPackage:
    """Read and verify a package file: content hash, manifest structure, tensor set. Never unpickles.

    A v1 file (petah 0.1) still loads, with a warning: its hash covers the tensors only.
    """
    path = Path(path)
    header = _header(path)
    raw = _raw_manifest(path, header)
    try:
        with safe_open(str(path), framework="numpy") as handle:
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except Exception as exc:  # safetensors raises several types for truncated data
        raise PetahError(f"{path} is truncated or corrupt: {str(exc).splitlines()[0]}") from exc
    manifest = Manifest.from_dict(raw, str(path))
    if manifest.format_version == 1:
        if tensors_sha256(tensors) != raw.get(V1_HASH_FIELD):
            raise PetahError(f"{path} is corrupt: the tensor payload does not match its sha256")
        warnings.warn(f"{path} is a format-1 package: its manifest is not covered by a hash "
                      f"(`petah upgrade {path}` rewrites it as format {FORMAT_VERSION})", PetahWarning, stacklevel=2)
    elif content_sha256(raw, tensors) != raw.get(HASH_FIELD):
        raise PetahError(f"{path} was modified or is corrupt: its manifest and tensors do not match its content hash")
    signature = header.get(SIGNATURE_KEY, "")
    unknown = sorted(set(header) - set(HEADER_KEYS))
    if unknown:
        raise PetahError(f"{path}: unknown header key {unknown[0]!r} (this petah writes {', '.join(HEADER_KEYS)})")
    expected = manifest.tensor_names()
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing:
        raise PetahError(f"{path} is missing {len(missing)} tensor(s), e.g. {missing[0]}")
    if extra:
        raise PetahError(f"{path} holds {len(extra)} tensor(s) its manifest does not name, e.g. {extra[0]}")
    return TaskPackage(manifest, tensors, signature)


def upgrade_package(path: str | Path, output: str | Path | None = None, trust=None) -> tuple[Path, int]:
    """Rewrite a package in the current format; returns the path and the version it had. With
    ``trust`` (a ``TrustPolicy``) a package it refuses is refused before anything is written.

    A current file is verified and copied byte for byte (its content hash and signature stay valid)."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PetahWarning)  # upgrading is the answer to that warning
        package = read_package(path)
    if trust is not None:
        trust.check(package, f"package {path}")
    was = package.manifest.format_version
    if was in CURRENT_VERSIONS:
        if output is not None and Path(output).resolve() != path.resolve():
            atomic_write_bytes(Path(output), path.read_bytes())
        return Path(output or path), was
    package.signature = ""  # a v1 file has none; a new hash would not match an old one anyway
    return write_package(output or path, package), was


def set_signature(path: str | Path, signature: str) -> Path:
    """Rewrite only the header's signature slot; the content hash (and so what was signed) is unchanged."""
    path = Path(path)
    package = read_package(path)
    if package.manifest.format_version not in CURRENT_VERSIONS:
        raise PetahError(f"{path} is a format-{package.manifest.format_version} package: "
                         "`petah upgrade` it before signing")
    header = _header(path)  # the manifest string is kept byte for byte: nothing hashed is rewritten
    mode = stat.S_IMODE(path.stat().st_mode)
    atomic_write_bytes(path, save(_contiguous(package.tensors), metadata={**header, SIGNATURE_KEY: signature}))
    os.chmod(path, mode)  # whoever could read the package still can (the temp file was 0600)
    return path
