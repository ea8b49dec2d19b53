"""A copy of a module tree that shares every tensor but none of the structure.

Adding a task's adapters changes the model's structure (PEFT wraps layers, adds entries to each
layer's adapter dicts and sets every layer's active adapter). A server cannot do that to the live
model while it runs a batch, and doing it on the inference thread made requests wait ~55 ms per
install (more under load, as the work competes for the GIL). Instead the adapters are added to a
*shadow*: every module object copied (its ``__dict__``, dicts and lists one level deep, methods
bound to the copy), every parameter and buffer shared, so the copy costs no tensor memory and
injecting into it leaves the live model untouched. Making it live is then one assignment of the
root's state between two batches (``transplant``).
"""

from __future__ import annotations

import copy
import types

import torch.nn as nn


def shadow_copy(model: nn.Module) -> nn.Module:
    """``model``'s module tree copied object by object, its tensors shared."""
    return _copy(model, {})


def _copy(module: nn.Module, memo: dict[int, nn.Module]) -> nn.Module:
    if id(module) in memo:  # a module reachable twice (PEFT's base_layer) stays one module
        return memo[id(module)]
    new = copy.copy(module)
    memo[id(module)] = new
    state = vars(new)
    for key, value in list(state.items()):
        if key == "_modules":
            state[key] = {name: None if child is None else _copy(child, memo) for name, child in value.items()}
        elif isinstance(value, types.MethodType) and value.__self__ is module:
            state[key] = types.MethodType(value.__func__, new)  # e.g. the weight-space forward
        elif isinstance(value, dict | list | set):
            state[key] = copy.copy(value)  # adapter dicts, active adapter lists, _parameters, caches
    return new


def transplant(live: nn.Module, shadow: nn.Module) -> dict:
    """Make ``live`` (whose object identity others hold) take over the shadow's structure; returns
    the replaced structure, for ``release``."""
    replaced = dict(vars(live))
    vars(live).update(vars(shadow))
    return replaced


def release(live: nn.Module, replaced: dict) -> None:
    """Let a replaced structure be freed at once: its modules' methods bound to themselves (the
    weight-space forward) are reference cycles that would wait for a full garbage collection, a
    pause of its own, and keep the tensors of removed adapters alive until then."""
    current = {id(m) for m in live.modules()}
    stack = [m for m in replaced.get("_modules", {}).values() if m is not None]
    while stack:
        module = stack.pop()
        if id(module) in current:
            continue
        current.add(id(module))  # visit once
        state = vars(module)
        for key in [k for k, v in state.items() if isinstance(v, types.MethodType) and v.__self__ is module]:
            del state[key]
        stack.extend(m for m in module._modules.values() if m is not None)


__all__ = ["release", "shadow_copy", "transplant"]
