"""A per-output-channel scale for depthwise (and grouped) convolutions, one per task.

Why our own layer: PEFT 0.21 refuses LoRA on a grouped conv unless rank % groups == 0 and
cannot merge it, and PEFT's IA3 (which would fit) cannot be mixed with LoRA in one model.
A depthwise kernel is tiny, so a scale per channel costs `channels` numbers and merges exactly:
s * (W x + b) == (s W) x + s b.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelScale(nn.Module):
    """Wraps a conv as ``base_layer``; with task ``t`` active, channel c is scaled by ``1 + deltas[t][c]``.

    Several tasks may hold a delta (like PEFT's named adapters); one is active at a time.
    """

    def __init__(self, base_layer: nn.Conv2d):
        super().__init__()
        self.base_layer = base_layer
        self.deltas = nn.ParameterDict()
        self.active: str | None = None
        self.merged_name: str | None = None

    def add(self, name: str) -> nn.Parameter:
        # delta (not the scale itself) is trained and stored: it starts at exactly zero and keeps
        # its precision when packages store adapters in fp16.
        weight = self.base_layer.weight
        self.deltas[name] = nn.Parameter(torch.zeros(self.base_layer.out_channels,
                                                     device=weight.device, dtype=weight.dtype))
        if self.active is None:
            self.active = name
        return self.deltas[name]

    def delete(self, name: str) -> None:
        if self.merged_name == name:
            self.unmerge()
        del self.deltas[name]
        if self.active == name:
            self.active = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.merged_name is not None or self.active not in self.deltas:
            return base(x)
        delta = self.deltas[self.active]
        if type(base) is nn.Conv2d and not torch.is_grad_enabled():
            # inference: scale the (tiny) kernel, not the (large) feature map — same result, and
            # faster at large maps; training keeps the output scaling (measured faster at 64 px).
            # addcmul: w + w·δ = w·(1 + δ) in one op (per-call op count matters on CPU).
            weight = torch.addcmul(base.weight, base.weight, delta.view(-1, 1, 1, 1))
            bias = torch.addcmul(base.bias, base.bias, delta) if base.bias is not None else None
            return base._conv_forward(x, weight, bias)
        out = base(x)  # convs with their own padding logic (timm's Conv2dSame): scale the output
        return out * (1.0 + delta).to(out.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def _rescale(self, name: str, op) -> None:
        scale = 1.0 + self.deltas[name]
        weight, bias = self.base_layer.weight, self.base_layer.bias
        op(weight, scale.view(-1, 1, 1, 1).to(weight.dtype))
        if bias is not None:
            op(bias, scale.to(bias.dtype))

    def merge(self, name: str | None = None) -> None:
        name = name or self.active
        if self.merged_name is None and name in self.deltas:
            self._rescale(name, torch.Tensor.mul_)
            self.merged_name = name

    def unmerge(self) -> None:
        if self.merged_name is not None:
            self._rescale(self.merged_name, torch.Tensor.div_)
            self.merged_name = None
