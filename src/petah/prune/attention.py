"""Pruning for the attention blocks of hybrid families, where Torch-Pruning needs help.

Torch-Pruning's dependency graph traces through reshapes and matmuls. On timm's hybrid
attention it cannot follow the heads: EfficientFormer's single ``qkv`` Linear interleaves q/k/v
per head (an IndexError in 1.6.1), and on EfficientFormerV2 (talking heads over the attention
map, bias tables gathered by index) the graph did not finish within 5 minutes here. So each
attention block is registered with Torch-Pruning as one opaque layer: the graph only sees its
input and output channels (the residual stream), which the pruners below cut. Whole heads are
removed separately, by ``prune_heads``, since Torch-Pruning has no notion of these heads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch_pruning as tp
from timm.models.efficientformer import Attention as EfficientFormerAttention
from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample


def _keep(total: int, drop: Sequence[int]) -> list[int]:
    dropped = set(drop)
    return [i for i in range(total) if i not in dropped]


def _per_head(drop_heads: Sequence[int], width: int) -> list[int]:
    """Channel indices of the dropped heads, for a head-major layout of ``width`` channels each."""
    return [h * width + i for h in drop_heads for i in range(width)]


def _slice_parameter(owner: nn.Module, name: str, keep: list[int], dim: int) -> None:
    """Keep ``keep`` along ``dim`` of a raw parameter, with its gradient (Taylor importance reads it)."""
    old = getattr(owner, name)
    index = torch.tensor(keep, dtype=torch.long, device=old.device)
    new = nn.Parameter(old.data.index_select(dim, index), requires_grad=old.requires_grad)
    if old.grad is not None:
        new.grad = old.grad.index_select(dim, index)
    setattr(owner, name, new)


def _conv_norm_out(conv_norm: nn.Module, idxs: list[int]) -> None:
    tp.prune_conv_out_channels(conv_norm.conv, idxs)
    tp.prune_batchnorm_out_channels(conv_norm.bn, idxs)


def _depthwise_conv_norm(conv_norm: nn.Module, idxs: list[int]) -> None:
    tp.prune_depthwise_conv_out_channels(conv_norm.conv, idxs)
    tp.prune_batchnorm_out_channels(conv_norm.bn, idxs)


class _OpaqueAttention(tp.BasePruningFunc):
    """An attention block as Torch-Pruning sees it: input and output channels only."""

    def get_in_channels(self, layer):
        first = self.input_layers(layer)[0]
        return first.in_features if isinstance(first, nn.Linear) else first.in_channels

    def get_out_channels(self, layer):
        last = self.output_layer(layer)
        return last.out_features if isinstance(last, nn.Linear) else last.out_channels


class EfficientFormerV2AttentionPruner(_OpaqueAttention):
    """timm ``Attention2d`` / ``Attention2dDownsample``: q, k, v, v_local, talking heads, proj."""

    TARGET_MODULES = (Attention2d, Attention2dDownsample)

    @staticmethod
    def input_layers(layer) -> list[nn.Conv2d]:
        q = layer.q.proj.conv if isinstance(layer, Attention2dDownsample) else layer.q.conv
        return [q, layer.k.conv, layer.v.conv]

    @staticmethod
    def output_layer(layer) -> nn.Conv2d:
        return layer.proj.conv

    def prune_in_channels(self, layer, idxs):
        for conv in self.input_layers(layer):
            tp.prune_conv_in_channels(conv, idxs)
        if isinstance(layer, Attention2dDownsample):  # the local query path is depthwise on the input
            tp.prune_depthwise_conv_out_channels(layer.q.local, idxs)
        elif layer.stride_conv is not None:
            _depthwise_conv_norm(layer.stride_conv, idxs)
        return layer

    def prune_out_channels(self, layer, idxs):
        _conv_norm_out(layer.proj, idxs)
        if isinstance(layer, Attention2dDownsample):
            layer.out_dim = layer.proj.conv.out_channels
        return layer


class EfficientFormerAttentionPruner(_OpaqueAttention):
    """timm EfficientFormer (V1) ``Attention``: one qkv Linear, heads interleaved, and proj."""

    TARGET_MODULES = (EfficientFormerAttention,)

    @staticmethod
    def input_layers(layer) -> list[nn.Linear]:
        return [layer.qkv]

    @staticmethod
    def output_layer(layer) -> nn.Linear:
        return layer.proj

    def prune_in_channels(self, layer, idxs):
        tp.prune_linear_in_channels(layer.qkv, idxs)
        return layer

    def prune_out_channels(self, layer, idxs):
        tp.prune_linear_out_channels(layer.proj, idxs)
        return layer


ATTENTION_PRUNERS: dict[type, tp.BasePruningFunc] = {
    Attention2d: EfficientFormerV2AttentionPruner(),
    Attention2dDownsample: EfficientFormerV2AttentionPruner(),
    EfficientFormerAttention: EfficientFormerAttentionPruner(),
}


# --- whole heads ---------------------------------------------------------------------------
def head_slices(layer: nn.Module) -> list[tuple[torch.Tensor, int, int]]:
    """(tensor, dim, channels per head) of every weight that is laid out head by head."""
    heads = layer.num_heads
    if isinstance(layer, EfficientFormerAttention):
        per_head = layer.qkv.out_features // heads  # q, k, v of one head are adjacent rows
        return [(layer.qkv.weight, 0, per_head), (layer.qkv.bias, 0, per_head),
                (layer.proj.weight, 1, layer.val_dim), (layer.attention_biases, 0, 1)]
    q = layer.q.proj.conv if isinstance(layer, Attention2dDownsample) else layer.q.conv
    key, value = q.out_channels // heads, layer.v.conv.out_channels // heads
    out = [(q.weight, 0, key), (layer.k.conv.weight, 0, key), (layer.v.conv.weight, 0, value),
           (layer.proj.conv.weight, 1, value), (layer.attention_biases, 0, 1)]
    if isinstance(layer, Attention2d):
        out += [(layer.talking_head1.weight, 0, 1), (layer.talking_head2.weight, 1, 1)]
    return out


def head_importance(layer: nn.Module, taylor: bool) -> torch.Tensor:
    """One score per head: the summed squared weights of its slices, or |weight x grad| (Taylor)."""
    scores = torch.zeros(layer.num_heads)
    for tensor, dim, width in head_slices(layer):
        values = tensor.detach()
        if taylor and tensor.grad is not None:
            values = (values * tensor.grad).abs()
        else:
            values = values.pow(2)
        per_channel = values.transpose(0, dim).reshape(values.shape[dim], -1).sum(1)
        per_head = per_channel.reshape(layer.num_heads, width).sum(1)
        scores += per_head / per_head.sum().clamp_min(1e-12)  # each tensor weighs the same
    return scores


def prune_heads(layer: nn.Module, drop: Sequence[int]) -> None:
    """Remove whole heads from a supported attention block, keeping the rest exactly as they were."""
    drop = sorted(set(int(h) for h in drop))
    if not drop:
        return
    heads = layer.num_heads
    if not all(0 <= h < heads for h in drop) or len(drop) >= heads:
        raise ValueError(f"cannot drop heads {drop} of {heads}")
    if isinstance(layer, EfficientFormerAttention):
        tp.prune_linear_out_channels(layer.qkv, _per_head(drop, layer.qkv.out_features // heads))
        tp.prune_linear_in_channels(layer.proj, _per_head(drop, layer.val_dim))
        layer.num_heads = heads - len(drop)
        layer.key_attn_dim = layer.key_dim * layer.num_heads
        layer.val_attn_dim = layer.val_dim * layer.num_heads
    else:
        q = layer.q.proj if isinstance(layer, Attention2dDownsample) else layer.q
        key, value = q.conv.out_channels // heads, layer.v.conv.out_channels // heads
        _conv_norm_out(q, _per_head(drop, key))
        _conv_norm_out(layer.k, _per_head(drop, key))
        value_idxs = _per_head(drop, value)
        _conv_norm_out(layer.v, value_idxs)
        _depthwise_conv_norm(layer.v_local, value_idxs)
        tp.prune_conv_in_channels(layer.proj.conv, value_idxs)
        if isinstance(layer, Attention2d):  # talking heads mix heads: drop their rows and columns
            for talk in (layer.talking_head1, layer.talking_head2):
                tp.prune_conv_out_channels(talk, drop)
                tp.prune_conv_in_channels(talk, drop)
        layer.num_heads = heads - len(drop)
        layer.dh = layer.d * layer.num_heads
    _slice_parameter(layer, "attention_biases", _keep(heads, drop), 0)
    layer.attention_bias_cache = {}  # the eval-mode cache holds the old table


def attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if type(m) in ATTENTION_PRUNERS]


def unsupported_attention(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first head-structured layer petah has no pruner for (any module with ``num_heads``)."""
    handled = set(ATTENTION_PRUNERS)
    for name, module in model.named_modules():
        if type(module) in handled:
            continue
        if isinstance(getattr(module, "num_heads", None), int) or isinstance(getattr(module, "heads", None), int):
            if not any(name.startswith(h + ".") for h, _ in attention_layers(model)):
                return name, module
    return None


def prune_all_heads(model: nn.Module, ratio: Callable[[str], float], taylor: bool) -> dict[str, int]:
    """Drop ``floor(ratio(layer name) * heads)`` least important heads from every supported block
    (one kept)."""
    removed = {}
    for name, layer in attention_layers(model):
        count = min(int(ratio(name) * layer.num_heads), layer.num_heads - 1)
        if count <= 0:
            continue
        scores = head_importance(layer, taylor)
        prune_heads(layer, scores.argsort()[:count].tolist())
        removed[name] = count
    return removed


__all__ = ["ATTENTION_PRUNERS", "attention_layers", "head_importance", "prune_all_heads", "prune_heads",
           "unsupported_attention"]
