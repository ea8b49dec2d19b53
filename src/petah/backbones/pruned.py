"""The architecture of a pruned backbone as JSON: what differs from the timm model of that name.

A pruned model is its timm model with smaller tensors and a few changed size attributes
(``out_channels``, ``num_heads``, ``dh``…). Recording only those attribute changes, next to the
tensors' own shapes in the safetensors file, rebuilds it without pickle: build the timm model,
set the attributes, give every tensor its stored shape, load the weights strictly.

It lives with the backbones (not in ``petah.prune``) because loading a pruned backbone must not
import the pruner and Torch-Pruning: ``petah.prune`` records the changes, this module rebuilds them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from petah.errors import PetahError

ARCHITECTURE_FORMAT = "petah-pruned-architecture/1"
_SIMPLE = (bool, int, float)


def _size_attributes(module: nn.Module) -> dict:
    """The plain-number attributes of one module (sizes, head counts, scales)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _SIMPLE) or (isinstance(value, tuple) and all(isinstance(v, _SIMPLE) for v in value)):
            out[key] = value
    return out


def _model_widths(model: nn.Module) -> dict:
    """timm's model-level widths that heads and feature extraction read."""
    widths = {k: getattr(model, k) for k in ("num_features", "head_hidden_size", "embed_dim")
              if isinstance(getattr(model, k, None), int)}
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and all(isinstance(i, dict) and "num_chs" in i for i in info):
        widths["feature_info_num_chs"] = [int(i["num_chs"]) for i in info]
    return widths


def describe_changes(base: nn.Module, pruned: nn.Module) -> dict:
    """The JSON-able difference in size attributes between ``base`` and ``pruned`` (same names)."""
    base_modules = dict(base.named_modules())
    modules = {}
    for name, module in pruned.named_modules():
        ref = base_modules.get(name)
        if ref is None or type(ref) is not type(module):
            raise PetahError(f"pruned model changed its module structure at {name or 'the root'}")
        before, after = _size_attributes(ref), _size_attributes(module)
        changed = {k: (list(v) if isinstance(v, tuple) else v) for k, v in after.items() if before.get(k) != v}
        if changed:
            modules[name] = changed
    return {"format": ARCHITECTURE_FORMAT, "modules": modules, "model": _model_widths(pruned)}


def apply_changes(model: nn.Module, architecture: dict, state: dict[str, torch.Tensor]) -> nn.Module:
    """Turn a freshly built timm model into the pruned one described by ``architecture`` + ``state``."""
    if architecture.get("format") != ARCHITECTURE_FORMAT:
        raise PetahError(f"unknown pruned-architecture format {architecture.get('format')!r}")
    modules = dict(model.named_modules())
    for name, changes in architecture.get("modules", {}).items():
        module = modules.get(name)
        if module is None:
            raise PetahError(f"pruned architecture names a layer {name!r} that {type(model).__name__} lacks")
        own = _size_attributes(module)
        for key, value in changes.items():
            if key not in own:  # only sizes the module already has may change: no arbitrary attributes
                raise PetahError(f"pruned architecture sets {name}.{key}, which is not a size attribute")
            value = tuple(value) if isinstance(own[key], tuple) else value
            if type(value) is not type(own[key]):
                raise PetahError(f"pruned architecture gives {name}.{key} a {type(value).__name__}")
            setattr(module, key, value)
    widths = architecture.get("model", {})
    for key, value in widths.items():
        if key == "feature_info_num_chs":
            for info, chs in zip(model.feature_info, value, strict=True):
                info["num_chs"] = chs
        elif isinstance(getattr(model, key, None), int):
            setattr(model, key, int(value))
    _reshape_tensors(model, state)
    return model


def _reshape_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give each parameter and persistent buffer the stored shape (values come with load_state_dict)."""
    own = model.state_dict()
    for key, value in state.items():
        if key not in own or own[key].shape == value.shape:
            continue
        owner_name, _, leaf = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        empty = torch.empty(value.shape, dtype=own[key].dtype)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(empty, requires_grad=owner._parameters[leaf].requires_grad)
        else:
            owner._buffers[leaf] = empty


__all__ = ["ARCHITECTURE_FORMAT", "apply_changes", "describe_changes"]
