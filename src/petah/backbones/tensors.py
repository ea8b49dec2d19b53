"""numpy arrays (how packages hold tensors: ``petah.packages.tensors``) to torch and back; bfloat16
travels as raw 16-bit words, since torch cannot take numpy's (ml_dtypes') bfloat16."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

BF16 = np.dtype(ml_dtypes.bfloat16)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(BF16)
    return tensor.numpy()


def to_torch(array: np.ndarray) -> torch.Tensor:
    array = np.require(array, requirements="C")
    if array.dtype == BF16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if not array.flags.writeable:  # safetensors' arrays are read-only views; torch wants to own writable memory
        array = array.copy()
    return torch.from_numpy(array)


__all__ = ["to_numpy", "to_torch"]
