"""Tensors as the device side holds them: numpy arrays (bfloat16 through ``ml_dtypes``, which
safetensors' numpy reader and ONNX use too). The content hash and the backbone fingerprint are
defined over raw little-endian bytes, so numpy computes exactly what torch computed before."""

from __future__ import annotations

import hashlib

import ml_dtypes
import numpy as np

# safetensors' dtype names (what a third-party reader sees in a file's header) and torch's names
# (the backbone fingerprint hashes ``str(torch dtype)``, fixed when fingerprints were defined)
DTYPES: dict[str, tuple[np.dtype, str]] = {
    "F64": (np.dtype(np.float64), "torch.float64"), "F32": (np.dtype(np.float32), "torch.float32"),
    "F16": (np.dtype(np.float16), "torch.float16"), "BF16": (np.dtype(ml_dtypes.bfloat16), "torch.bfloat16"),
    "I64": (np.dtype(np.int64), "torch.int64"), "I32": (np.dtype(np.int32), "torch.int32"),
    "I16": (np.dtype(np.int16), "torch.int16"), "I8": (np.dtype(np.int8), "torch.int8"),
    "U8": (np.dtype(np.uint8), "torch.uint8"), "BOOL": (np.dtype(np.bool_), "torch.bool"),
}
SAFETENSORS_NAMES = {dtype: name for name, (dtype, _torch) in DTYPES.items()}
TORCH_NAMES = {dtype: torch_name for dtype, torch_name in DTYPES.values()}
FLOAT_NAMES = {"float16": np.dtype(np.float16), "bfloat16": np.dtype(ml_dtypes.bfloat16),
               "float32": np.dtype(np.float32)}


def raw_bytes(array: np.ndarray) -> bytes:
    """The array's bytes in C order, little-endian (what safetensors stores)."""
    array = np.require(array, requirements="C")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).view(np.uint8).tobytes()


def tensors_sha256(tensors: dict[str, np.ndarray]) -> str:
    """The backbone fingerprint (and format-1 payload hash): sha256 over (key, shape, torch dtype
    name, raw bytes) of every tensor in sorted key order — equal to what the torch side computes."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = tensors[key]
        digest.update(key.encode())
        digest.update(str(tuple(int(n) for n in array.shape)).encode())
        digest.update(TORCH_NAMES[array.dtype.newbyteorder("=")].encode())
        digest.update(raw_bytes(array))
    return digest.hexdigest()


def as_float32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


__all__ = ["DTYPES", "FLOAT_NAMES", "SAFETENSORS_NAMES", "TORCH_NAMES", "as_float32", "raw_bytes", "tensors_sha256"]
