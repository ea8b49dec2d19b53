"""Inference forward of PEFT's LoRA layers in weight space: one conv / matmul with W0 + s·BA.

PEFT's forward adds the low-rank branch in activation space: two extra convolutions (or
matmuls) over the full feature map. At inference the delta weight is tiny to build, so this
path costs about what the plain layer costs (`petah bench latency`, unmerged vs plain). The
delta is one ``addmm`` (B (out×r) @ A (r×in·k·k) added to W0 viewed as a matrix); PEFT's
``get_delta_weight`` needs ~6 ops per layer (casts, squeezes, a conv for k×k kernels), which
measured +10 ms per image on efficientformerv2_s0 (48 layers) on 2 CPU cores.

Training (grad enabled or train mode), merged layers, several active adapters and layer types
other than plain ``nn.Conv2d`` / ``nn.Linear`` keep PEFT's own forward.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer


def delta_weight(layer: LoraLayer, name: str) -> torch.Tensor:
    """W0 + s·B·A for adapter ``name`` (B's kernel is 1×1, so k×k convs need no conv here)."""
    weight = layer.get_base_layer().weight
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    rank = a.shape[0]
    flat = torch.addmm(weight.reshape(weight.shape[0], -1), b.reshape(-1, rank),
                       a.reshape(rank, -1), alpha=layer.scaling[name])
    return flat.view_as(weight)


def _weight_space_applies(layer: LoraLayer, base: nn.Module) -> bool:
    if torch.is_grad_enabled() or layer.training or layer.merged or layer.disable_adapters:
        return False
    if len(layer.active_adapters) != 1 or layer.active_adapters[0] not in layer.lora_A:
        return False
    if layer.active_adapters[0] in getattr(layer, "lora_variant", {}):  # DoRA & co.
        return False
    if type(base) is nn.Conv2d:  # timm's Conv2dSame & co. pad in their own forward
        return base.groups == 1 and base.padding_mode == "zeros"
    return type(base) is nn.Linear


def lora_inference_forward(layer: LoraLayer, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = layer.get_base_layer()
    if args or kwargs or not _weight_space_applies(layer, base):
        return type(layer).forward(layer, x, *args, **kwargs)
    weight = delta_weight(layer, layer.active_adapters[0])
    if weight.dtype != x.dtype:
        return type(layer).forward(layer, x)
    if type(base) is nn.Linear:
        return F.linear(x, weight, base.bias)
    return base._conv_forward(x, weight, base.bias)


def use_weight_space_inference(model: nn.Module) -> None:
    """Give every LoRA layer of ``model`` the weight-space inference forward (idempotent)."""
    for layer in model.modules():
        if isinstance(layer, LoraLayer) and "forward" not in vars(layer):
            layer.forward = types.MethodType(lora_inference_forward, layer)
