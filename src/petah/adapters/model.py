"""Attach a task's adapters to a backbone: inject, train, extract, merge, unmerge, restore.

LoRA on Linear and dense Conv2d layers is PEFT's (``inject_adapter_in_model``); depthwise convs
get our ``ChannelScale``. Tensors a task replaces outright (its own norm affine / statistics,
BitFit biases, or everything for ``full``) are *overrides*: the backbone's originals are kept
so that removing the task restores the shared backbone bit for bit.

Adapter tensors are stored under names that do not depend on PEFT internals:
``<module>.lora_A``, ``<module>.lora_B``, ``<module>.lora_magnitude`` (DoRA; flat, one value per
output row) and ``<module>.scale_delta``.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from petah.adapters.channel_scale import ChannelScale
from petah.adapters.inference import use_weight_space_inference
from petah.adapters.targets import override_names, resolve_targets
from petah.backbones import Backbone
from petah.errors import PetahError
from petah.plans import CHANNEL_SCALE, LORA, PlanConfig, Target
from petah.plans.base import MAGNITUDE, plain_name

ADAPTER = "default"  # the adapter name of a model that holds a single task


def _exact(names: list[str]) -> str:
    return "^(?:" + "|".join(re.escape(n) for n in names) + ")$"


def lora_config(targets: list[Target], config: PlanConfig) -> LoraConfig | None:
    """PEFT's LoraConfig for the plan's LoRA targets (None when it has none)."""
    lora = [t for t in targets if t.method == LORA]
    if not lora:
        return None
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.dropout,
        # A regex string is full-matched by PEFT; a list would also match name suffixes
        # ("conv1" would catch "layer1.0.conv1").
        target_modules=_exact([t.module for t in lora]),
        rank_pattern={"^" + re.escape(t.module): t.rank for t in lora if t.rank != config.rank},
        # Keep alpha / rank constant across per-stage ranks so a stage's update scale is stable;
        # rsLoRA instead scales each layer by alpha / sqrt(its rank) (PlanConfig.lora_scaling).
        alpha_pattern={} if config.rslora else {
            "^" + re.escape(t.module): config.lora_alpha * t.rank / config.rank
            for t in lora
            if t.rank != config.rank
        },
        use_rslora=config.rslora,
        use_dora=config.dora,
    )


def _inject_lora(model: nn.Module, targets: list[Target], config: PlanConfig, name: str) -> None:
    peft_config = lora_config(targets, config)
    if peft_config is None:
        return
    with warnings.catch_warnings():  # several named adapters in one model is the runtime's design
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(peft_config, model, adapter_name=name)
    use_weight_space_inference(model)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _inject_channel_scale(model: nn.Module, targets: list[Target], name: str) -> None:
    for target in targets:
        if target.method != CHANNEL_SCALE:
            continue
        layer = model.get_submodule(target.module)
        if not isinstance(layer, ChannelScale):
            layer = ChannelScale(layer)
            _replace(model, target.module, layer)
        layer.add(name)


def remove_adapter(model: nn.Module, name: str) -> None:
    """Delete adapter ``name`` from every layer holding it (also a half-done injection)."""
    for module_name, layer in list(model.named_modules()):
        if isinstance(layer, LoraLayer) and name in layer.lora_A:
            with warnings.catch_warnings():  # PEFT notes the active adapter moved; activate() sets it
                warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
                layer.delete_adapter(name)
            if not layer.lora_A:
                _replace(model, module_name, layer.get_base_layer())
        elif isinstance(layer, ChannelScale) and name in layer.deltas:
            layer.delete(name)
            if not layer.deltas:
                _replace(model, module_name, layer.base_layer)
    getattr(model, "peft_config", {}).pop(name, None)  # PEFT keeps every adapter's config on the model
    refresh_attention_caches(model)


def refresh_attention_caches(model: nn.Module) -> None:
    """EfficientFormer(V2) caches attention biases in eval mode; drop them after weights change."""
    for module in model.modules():
        if getattr(module, "attention_bias_cache", None):
            module.attention_bias_cache = {}


class TaskAdapter:
    """One task's adaptation of a backbone model (modified in place), as the adapter ``name``.

    Several tasks may live in one model under different names (the runtime); ``activate``
    selects one, ``remove`` takes one out again.
    """

    def __init__(self, backbone: Backbone, config: PlanConfig, targets: list[Target] | None = None,
                 name: str = ADAPTER):
        self.backbone = backbone
        self.config = config
        self.name = name
        model = backbone.model
        if targets is None:
            targets = resolve_targets(model, backbone.family, config, backbone.name)
        self.targets = targets
        self.override_keys = override_names(model, config)
        self._originals = {k: t.detach().clone() for k, t in self._override_tensors().items()}
        _inject_lora(model, self.targets, config, name)
        _inject_channel_scale(model, self.targets, name)
        for layer in self.adapted_layers():  # new modules start in train mode: follow the model's
            layer.train(model.training)
        model.requires_grad_(False)
        for param in self.trainable_parameters():
            param.requires_grad_(True)
        self.merged = False

    @property
    def model(self) -> nn.Module:
        return self.backbone.model

    @staticmethod
    def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
        """Backbone tensors under their plain names, wherever adapter wrappers moved them."""
        named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        return {plain: t for key, t in named.items() if (plain := plain_name(key))}

    def _layer(self, target: Target) -> nn.Module:
        layer = self.model.get_submodule(target.module)
        expected = LoraLayer if target.method == LORA else ChannelScale
        if not isinstance(layer, expected):
            raise PetahError(f"layer {target.module} is not adapted ({target.method})")
        return layer

    def _adapter_params(self) -> dict[str, nn.Parameter]:
        params: dict[str, nn.Parameter] = {}
        for target in self.targets:
            layer = self._layer(target)
            if target.method == LORA:
                params[f"{target.module}.lora_A"] = layer.lora_A[self.name].weight
                params[f"{target.module}.lora_B"] = layer.lora_B[self.name].weight
                if self.config.dora:  # PEFT holds a conv's as (1, out, 1, 1): stored flat
                    params[f"{target.module}.{MAGNITUDE}"] = layer.lora_magnitude_vector[self.name].weight
            else:
                params[f"{target.module}.scale_delta"] = layer.deltas[self.name]
        return params

    def _override_tensors(self) -> dict[str, torch.Tensor]:
        if not self.override_keys:  # most plans own no tensors: skip the walk over the whole model
            return {}
        tensors = self._named_tensors(self.model)
        return {k: tensors[k] for k in self.override_keys}

    def lora_b_parameters(self) -> list[nn.Parameter]:
        """LoRA's B matrices (LoRA+ trains them at a multiple of the rate)."""
        return [p for name, p in self._adapter_params().items() if name.endswith(".lora_B")]

    def trainable_parameters(self) -> list[nn.Parameter]:
        overrides = [t for t in self._override_tensors().values()
                     if isinstance(t, nn.Parameter) and t.is_floating_point()]
        return list(self._adapter_params().values()) + overrides

    def norm_modes(self) -> dict[str, bool]:
        """Which norm layers run in train mode while this task trains (the rest stay frozen): all
        for ``full`` and ``task_norm="stats"``; else those the task owns outright (a budget plan's)."""
        trains_stats = self.config.preset == "full" or self.config.task_norm == "stats"
        owned = set(self.config.override_modules)
        return {
            name: trains_stats or name in owned
            for name, m in self.model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        }

    # --- state -------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().reshape(-1) if k.endswith(MAGNITUDE) else v.detach().clone()
                for k, v in self._adapter_params().items()}

    def override_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self._override_tensors().items()}

    @torch.no_grad()
    def load_state(self, adapters: dict[str, torch.Tensor], overrides: dict[str, torch.Tensor]) -> None:
        for dest, source, what in ((self._adapter_params(), adapters, "adapter"),
                                   (self._override_tensors(), overrides, "override")):
            missing = sorted(set(dest) - set(source))
            extra = sorted(set(source) - set(dest))
            if missing or extra:
                raise PetahError(f"{what} tensors do not match the plan: missing {missing[:3]}, unexpected {extra[:3]}")
            for key, tensor in dest.items():
                value = source[key]
                if key.endswith(MAGNITUDE) and tuple(value.shape) == (tensor.numel(),):  # stored flat
                    value = value.reshape(tensor.shape)
                if tuple(value.shape) != tuple(tensor.shape):
                    raise PetahError(f"{what} tensor {key} has shape {tuple(value.shape)}, expected "
                                     f"{tuple(tensor.shape)}")
                tensor.copy_(value.to(tensor.dtype))
        refresh_attention_caches(self.model)

    # --- several tasks in one model ------------------------------------------------------
    def adapted_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, (LoraLayer, ChannelScale))]

    def activate(self, layers: list[nn.Module] | None = None) -> None:
        """Make this task the one every adapted layer runs (a pointer switch, no weight copies).

        ``layers``: the model's adapted layers, when the caller keeps them (saves a module walk).
        """
        for layer in self.adapted_layers() if layers is None else layers:
            if isinstance(layer, LoraLayer):
                layer._active_adapter = [self.name]
            else:
                layer.active = self.name

    def remove(self) -> None:
        """Take this task's adapters out; layers left without any adapter become plain again."""
        if self.merged:
            self.unmerge()
        self.restore_overrides()
        remove_adapter(self.model, self.name)

    # --- merge ---------------------------------------------------------------------------
    def merge(self) -> None:
        """Fold this task's adapters into the backbone weights: zero-overhead inference."""
        for target in self.targets:
            layer = self._layer(target)
            layer.merge(adapter_names=[self.name]) if target.method == LORA else layer.merge(self.name)
        refresh_attention_caches(self.model)
        self.merged = True

    def unmerge(self) -> None:
        for target in self.targets:
            self._layer(target).unmerge()
        refresh_attention_caches(self.model)
        self.merged = False

    def backbone_weights(self) -> dict[str, torch.Tensor]:
        """The (possibly merged) weights under the plain backbone's key names."""
        return {plain: v for key, v in self.model.state_dict().items() if (plain := plain_name(key))}

    @torch.no_grad()
    def apply_overrides(self, values: dict[str, torch.Tensor]) -> None:
        if not values:
            return
        tensors = self._override_tensors()
        for key, value in values.items():
            tensors[key].copy_(value)
        refresh_attention_caches(self.model)

    @torch.no_grad()
    def restore_overrides(self) -> None:
        """Put the shared backbone's own norm / bias tensors back."""
        self.apply_overrides(self._originals)
