"""The device's backbone: the folder ``petah export --device`` writes (graph + weights + index),
read and verified without torch. Everything in it is untrusted until its hashes check out: the
manifest names the sha256 of the graph and of the weights file, and the weights must give the
backbone's fingerprint, so a package trained on this backbone is known to fit."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from petah.errors import PetahError
from petah.imaging import Preprocess
from petah.packages.tensors import tensors_sha256

BUNDLE_FORMAT = "petah-device"
BUNDLE_VERSION = 1
GRAPH_FILE, WEIGHTS_FILE, MANIFEST_FILE = "backbone.onnx", "weights.safetensors", "device.json"
MAX_MANIFEST_BYTES = 16 * 2**20


@dataclass
class DeviceBackbone:
    """The shared backbone on a device: graph bytes, every weight once (numpy), and its identity."""

    name: str
    img_size: int
    fingerprint: str
    weights_bytes: int
    pruned: bool
    preprocessing: dict
    num_features: int
    outputs: dict
    index: dict[str, str]  # state-dict key -> initializer name in the graph
    graph: bytes
    weights: dict[str, np.ndarray] = field(repr=False)
    path: Path | None = None
    weights_file: str | None = None  # where the weights were read from, when not the folder's own file
    _value_types: dict | None = field(default=None, repr=False)

    def describe(self) -> str:
        pruned = "pruned " if self.pruned else ""
        return f"{pruned}{self.name}@{self.img_size}px (fingerprint {self.fingerprint[:12]})"

    def identity(self) -> dict:
        return {"name": self.name, "img_size": self.img_size, "fingerprint": self.fingerprint,
                "weights_bytes": self.weights_bytes, "pruned": self.pruned}

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.preprocessing)

    @property
    def resident_bytes(self) -> int:
        return sum(int(a.nbytes) for a in self.weights.values())

    def value_types(self) -> dict[str, int]:
        """Element type (ONNX TensorProto enum) of every value in the graph, inferred once with the
        weights' shapes (what a graph cut between a trunk and a task declares)."""
        if self._value_types is None:
            import onnx
            from onnx import numpy_helper

            model = onnx.load_from_string(self.graph)
            if model.graph.value_info:  # the exporter records them (petah export --device)
                self._value_types = {value.name: value.type.tensor_type.elem_type for value in
                                     [*model.graph.value_info, *model.graph.input, *model.graph.output]}
                return self._value_types
            model.graph.initializer.extend(numpy_helper.from_array(self.weights[key], name)
                                           for key, name in self.index.items())
            inferred = onnx.shape_inference.infer_shapes(model)
            self._value_types = {value.name: value.type.tensor_type.elem_type for value in
                                 [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
        return self._value_types


def _compute_dtype(array: np.ndarray) -> np.ndarray:
    """Weights may be stored in 16 bits (a backbone file's choice); the graph computes in float32,
    as the build side does after loading them, and the fingerprint is over that."""
    if array.dtype.kind == "f" or str(array.dtype) == "bfloat16":
        return np.asarray(array, dtype=np.float32)
    return array


def _fail(path: Path, what: str) -> PetahError:
    return PetahError(f"device backbone {path}: {what}")


def read_device_backbone(path: str | Path, weights: str | Path | None = None) -> DeviceBackbone:
    """Read and verify a device backbone folder; any problem is one line naming the folder.
    ``weights``: the weights file when it is not the folder's own (the bundled demo shares the
    demo backbone's file); its sha256 must still be the one the manifest names."""
    path = Path(path)
    files = {name: path / name for name in (GRAPH_FILE, WEIGHTS_FILE, MANIFEST_FILE)}
    weights_file = None if weights is None else str(Path(weights).resolve())
    if weights is not None:
        files[WEIGHTS_FILE] = Path(weights)
    if not path.is_dir():
        raise PetahError(f"device backbone not found: {path} (make one with `petah export --device -b NAME -o DIR`)")
    for name, file in files.items():
        if not file.is_file():
            raise _fail(path, f"{name} is missing")
    if files[MANIFEST_FILE].stat().st_size > MAX_MANIFEST_BYTES:
        raise _fail(path, f"{MANIFEST_FILE} is over {MAX_MANIFEST_BYTES // 2**20} MiB")
    try:
        info = json.loads(files[MANIFEST_FILE].read_text(encoding="utf-8"))
    except (ValueError, UnicodeError, RecursionError) as exc:
        raise _fail(path, f"{MANIFEST_FILE} is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT:
        raise _fail(path, f"{MANIFEST_FILE} is not a petah device manifest")
    if info.get("format_version") != BUNDLE_VERSION:
        raise _fail(path, f"format version {info.get('format_version')!r} (this petah reads {BUNDLE_VERSION})")
    graph = files[GRAPH_FILE].read_bytes()
    if hashlib.sha256(graph).hexdigest() != info.get("graph_sha256"):
        raise _fail(path, f"{GRAPH_FILE} was modified or is corrupt (its sha256 does not match {MANIFEST_FILE})")
    digest = hashlib.sha256()
    with files[WEIGHTS_FILE].open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != info.get("weights_sha256"):
        raise _fail(path, f"{WEIGHTS_FILE} was modified or is corrupt (its sha256 does not match {MANIFEST_FILE})")
    try:
        with safe_open(str(files[WEIGHTS_FILE]), framework="numpy") as handle:
            weights = {key: _compute_dtype(handle.get_tensor(key)) for key in handle.keys()}
        backbone, outputs, index = info["backbone"], info["outputs"], info["index"]
        device = DeviceBackbone(
            name=str(backbone["name"]), img_size=int(backbone["img_size"]), fingerprint=str(backbone["fingerprint"]),
            weights_bytes=int(backbone.get("weights_bytes") or 0), pruned=bool(backbone.get("pruned")),
            preprocessing=dict(info["preprocessing"]), num_features=int(info["num_features"]),
            outputs=dict(outputs), index={str(k): str(v) for k, v in dict(index).items()}, graph=graph,
            weights=weights, path=path, weights_file=weights_file)
        Preprocess.from_dict(device.preprocessing)
    except PetahError:
        raise
    except Exception as exc:  # a malformed field of any kind
        raise _fail(path, f"{MANIFEST_FILE} is malformed ({type(exc).__name__}: {exc})") from None
    try:
        fingerprint = tensors_sha256(weights)
    except KeyError as exc:  # a dtype the fingerprint has no name for
        raise _fail(path, f"its weights hold a tensor of dtype {exc.args[0]}, which a backbone does not") from None
    if fingerprint != device.fingerprint:
        raise _fail(path, "its weights do not give the backbone fingerprint it names")
    unknown = sorted(set(device.index) - set(weights))
    if unknown:
        raise _fail(path, f"the index names {unknown[0]}, which its weights lack")
    return device


def pack_device_backbone(backbone: DeviceBackbone, weights: str | Path | None = None) -> bytes:
    """A device backbone folder as one file a release carries (an uncompressed tar of its three
    files: weights do not compress). ``weights``: the weights file where it is not the folder's."""
    if backbone.path is None:
        raise PetahError(f"{backbone.describe()} was not read from a folder: nothing to pack")
    files = {GRAPH_FILE: backbone.path / GRAPH_FILE, MANIFEST_FILE: backbone.path / MANIFEST_FILE,
             WEIGHTS_FILE: Path(weights or backbone.weights_file or backbone.path / WEIGHTS_FILE)}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name, file in files.items():
            data = file.read_bytes()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_device_backbone(data: bytes, output: str | Path, fingerprint: str) -> DeviceBackbone:
    """A packed backbone (untrusted bytes) written to ``output`` and read back verified: only the
    three files a device folder holds, as plain files of this name (never a path, link or device
    node), and the folder must be the backbone ``fingerprint``. Written beside and moved into
    place only when all of it checks out."""
    from petah.files import atomic_write_bytes, staged_folder

    output = Path(output)
    names = (GRAPH_FILE, WEIGHTS_FILE, MANIFEST_FILE)
    try:
        archive = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        members = archive.getmembers()
    except (tarfile.TarError, EOFError) as exc:
        raise PetahError(f"the backbone release is not a packed device backbone ({type(exc).__name__})") from None
    with archive:
        found = {m.name: m for m in members}
        if sorted(found) != sorted(names) or len(members) != len(names) or not all(m.isfile() for m in members):
            raise PetahError(f"the backbone release must hold exactly {', '.join(names)} as plain files")
        with staged_folder(output) as staging:
            for name in names:
                atomic_write_bytes(staging / name, archive.extractfile(found[name]).read())
            backbone = read_device_backbone(staging)  # hashes and fingerprint, before it is moved into place
            if backbone.fingerprint != fingerprint:
                raise PetahError(f"the backbone release is backbone {backbone.fingerprint[:16]}…, not the "
                                 f"{fingerprint[:16]}… its signed metadata names")
    return read_device_backbone(output)


__all__ = ["BUNDLE_FORMAT", "BUNDLE_VERSION", "DeviceBackbone", "GRAPH_FILE", "MANIFEST_FILE", "WEIGHTS_FILE",
           "pack_device_backbone", "read_device_backbone", "unpack_device_backbone"]
