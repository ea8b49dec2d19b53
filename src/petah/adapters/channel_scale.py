"""A per-output-channel scale for depthwise (and grouped) convolutions.

Why our own layer: PEFT 0.21 refuses LoRA on a grouped conv unless rank % groups == 0 and
cannot merge it, and PEFT's IA3 (which would fit) cannot be mixed with LoRA in one model.
A depthwise kernel is tiny, so a scale per channel costs `channels` numbers and merges exactly:
s * (W x + b) == (s W) x + s b.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class ChannelScale(nn.Module):
    """Wraps a conv as ``base_layer``; output channel c is scaled by ``1 + delta[c]``."""

    def __init__(self, base_layer: nn.Conv2d):
        super().__init__()
        self.base_layer = base_layer
        # delta (not the scale itself) is trained and stored: it starts at exactly zero and keeps
        # its precision when packages store adapters in fp16.
        self.delta = nn.Parameter(torch.zeros(base_layer.out_channels))
        self.merged = False

    def _scale(self) -> torch.Tensor:
        return 1.0 + self.delta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if self.merged:
            return out
        return out * self._scale().to(out.dtype).view(1, -1, 1, 1)

    @torch.no_grad()
    def _rescale(self, op) -> None:
        scale = self._scale()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        op(weight, scale.view(-1, 1, 1, 1).to(weight.dtype))
        if bias is not None:
            op(bias, scale.to(bias.dtype))

    def merge(self) -> None:
        if not self.merged:
            self._rescale(torch.Tensor.mul_)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(torch.Tensor.div_)
            self.merged = False
