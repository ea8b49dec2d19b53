"""Tensors as the device side holds them: numpy arrays (bfloat16 through ``ml_dtypes``, which
safetensors' numpy reader and ONNX use too; not imported here). The content hash and the backbone
fingerprint are defined over raw little-endian bytes, so numpy computes exactly what torch computed
before."""

from __future__ import annotations

import hashlib

import numpy as np

# safetensors' dtype names (what a third-party reader sees in a file's header) and torch's names
# (the backbone fingerprint hashes ``str(torch dtype)``, fixed when fingerprints were defined)
DTYPES: dict[str, tuple[str, str]] = {
    "F64": ("float64", "torch.float64"), "F32": ("float32", "torch.float32"), "F16": ("float16", "torch.float16"),
    "BF16": ("bfloat16", "torch.bfloat16"), "I64": ("int64", "torch.int64"), "I32": ("int32", "torch.int32"),
    "I16": ("int16", "torch.int16"), "I8": ("int8", "torch.int8"), "U8": ("uint8", "torch.uint8"),
    "BOOL": ("bool", "torch.bool"),
}
_BY_NUMPY_NAME = {numpy_name: (name, torch_name) for name, (numpy_name, torch_name) in DTYPES.items()}


def dtype_names(dtype: np.dtype) -> tuple[str, str] | None:
    """(safetensors name, torch name) of a numpy dtype a package may hold, else None. By name:
    bfloat16 is ml_dtypes', whose import alone takes 0.6-0.9 s (measured), paid only when a
    bfloat16 tensor is met (safetensors' reader imports it then)."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == ">":
        return None
    return _BY_NUMPY_NAME.get(dtype.name)


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
        names = dtype_names(array.dtype.newbyteorder("="))
        if names is None:
            raise KeyError(str(array.dtype))
        digest.update(names[1].encode())
        digest.update(raw_bytes(array))
    return digest.hexdigest()


def as_float32(array: np.ndarray) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


__all__ = ["DTYPES", "as_float32", "dtype_names", "raw_bytes", "tensors_sha256"]
