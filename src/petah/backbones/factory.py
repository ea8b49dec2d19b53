"""Create the shared, frozen backbone: a timm model without classifier, with its identity."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save

from petah.backbones.pruned import apply_changes
from petah.backbones.weights import adapt_state_dict, read_state_dict, tensors_sha256
from petah.errors import PetahError
from petah.files import atomic_write_bytes
from petah.plans import Family, family_for

BACKBONE_FORMAT = "petah-backbone/1"


@dataclass
class Backbone:
    """A frozen timm model (``num_classes=0``) plus what identifies it."""

    model: nn.Module
    name: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fingerprint: str
    source: dict = field(default_factory=dict)
    weights_bytes: int = 0  # the weights (no classifier) as an fp32 safetensors file
    architecture: dict | None = None  # a pruned backbone: its size changes against the timm model

    @property
    def pruned(self) -> bool:
        return self.architecture is not None

    @property
    def family(self) -> Family | None:
        return family_for(self.name)

    @property
    def num_features(self) -> int:
        """Width of the pooled output a head sees: timm's ``head_hidden_size`` where the model
        keeps a pre-logits layer (MobileNetV3's conv_head, EfficientViT's head MLP)."""
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def identity(self) -> dict:
        return {"name": self.name, "img_size": self.img_size, "fingerprint": self.fingerprint,
                "weights_bytes": self.weights_bytes, "pruned": self.pruned}

    def describe(self) -> str:
        pruned = "pruned " if self.pruned else ""
        return f"{pruned}{self.name}@{self.img_size}px (fingerprint {self.fingerprint[:12]})"

    def preprocessing(self) -> dict:
        return {
            "img_size": self.img_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "channel_order": "RGB",
            "resize": "bilinear, to a square",
            "scale": "pixel / 255",
        }


def fingerprint(model: nn.Module) -> str:
    """sha256 over (key, shape, dtype, bytes) of every parameter and buffer, sorted by key."""
    return tensors_sha256(model.state_dict())


def fp32_safetensors_bytes(model: nn.Module) -> int:
    state = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}
    return len(save(state))


def _check_img_size(name: str, family: Family | None, img_size: int | None, default: int) -> int:
    size = default if img_size is None else int(img_size)
    if family is not None and family.fixed_img_size is not None:
        if size != family.fixed_img_size:
            raise PetahError(
                f"{name} runs only at {family.fixed_img_size} px (timm ignores img_size for it); got {size}"
            )
        return size
    if family is not None and family.img_size_kwarg:  # the size shapes the model (position tables)
        multiple = family.img_size_multiple
        if size < multiple or size % multiple:
            raise PetahError(f"input size for {name} must be a multiple of {multiple}, got {size}")
    elif size < 16:
        raise PetahError(f"input size for {name} must be at least 16, got {size}")
    return size


def _build(name: str, family: Family | None, img_size: int, pretrained: bool = False) -> nn.Module:
    kwargs: dict = {"num_classes": 0, "pretrained": pretrained}
    if family is not None and family.img_size_kwarg:
        kwargs["img_size"] = img_size
    return timm.create_model(name, **kwargs)


def _build_pruned(name: str, family: Family | None, img_size: int, architecture: dict,
                  weights: dict[str, torch.Tensor]) -> nn.Module:
    """The timm model, reparameterized, then cut down to a pruned architecture (no weights yet)."""
    model = _build(name, family, img_size)
    _reparameterize(model)
    return apply_changes(model, architecture, weights)


def build_plain(backbone: Backbone, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh, wrapper-free copy of ``backbone``'s architecture holding ``weights`` (e.g. merged)."""
    if backbone.architecture is not None:
        model = _build_pruned(backbone.name, backbone.family, backbone.img_size, backbone.architecture, weights)
    else:
        model = _build(backbone.name, backbone.family, backbone.img_size)
        _reparameterize(model)
    model.load_state_dict(weights, strict=True)
    return model.eval().requires_grad_(False)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    classifier = model.pretrained_cfg.get("classifier") or ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], origin: str) -> None:
    state = adapt_state_dict(state, model, _classifier_prefixes(model))
    own = model.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise PetahError(
                f"weights {origin} do not fit {key}: {tuple(value.shape)} vs {tuple(own[key].shape)}"
            )
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {result.unexpected_keys[:3]}"
        raise PetahError(f"weights {origin} do not match the model: {detail}")


def read_backbone_metadata(path: str | Path) -> dict | None:
    """The petah metadata of a backbone file, or None for a plain weights file."""
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a bad header
        raise PetahError(f"cannot read backbone file {path}: {str(exc).splitlines()[0]}") from exc
    if meta.get("format") != BACKBONE_FORMAT:
        return None
    return json.loads(meta["petah"])


def create_backbone(name: str | None = None, img_size: int | None = None, weights: str = "none") -> Backbone:
    """Build a frozen backbone.

    ``weights``: ``"none"`` (random init), ``"hub"`` (timm's pretrained weights, needs network),
    or a path to a safetensors / torch state-dict file. A petah backbone file (from
    ``petah prepare``) also carries the timm name and input size, so ``name`` may be omitted.
    """
    meta, folded = None, False
    if weights not in ("none", "hub"):
        meta = read_backbone_metadata(weights)
        if meta is not None:
            if name is not None and name != meta["name"]:
                raise PetahError(f"backbone file {weights} holds {meta['name']}, not {name}")
            name = meta["name"]
            img_size = img_size if img_size is not None else meta["img_size"]
    if name is None:
        raise PetahError("no backbone named: give a timm model name or a petah backbone file")
    if not timm.is_model(name):
        raise PetahError(f"unknown timm model {name!r}")
    family = family_for(name)
    pretrained_cfg = timm.get_pretrained_cfg(name)
    default_size = pretrained_cfg.input_size[-1] if pretrained_cfg else 224
    size = _check_img_size(name, family, img_size, default_size)

    architecture = meta.get("architecture") if meta is not None else None
    if architecture is not None:  # a pruned backbone: rebuilt from its size changes, never unpickled
        if size != meta["img_size"]:
            raise PetahError(f"pruned backbone {weights} runs at {meta['img_size']} px only, got {size}")
        state = read_state_dict(weights)
        model = _build_pruned(name, family, size, architecture, state)
        _load_into(model, state, f"in {weights}")
    else:
        model = _build(name, family, size)
        if weights == "hub":
            try:
                # Built at the hub size: the bias tables of V2 are then resized to `size`.
                hub = _build(name, family, default_size, pretrained=True)
            except Exception as exc:  # network or hub errors come in many types
                raise PetahError(
                    f"cannot fetch hub weights for {name} ({type(exc).__name__}); "
                    "offline? pass --weights FILE or --weights none"
                ) from exc
            _load_into(model, hub.state_dict(), "from the hub")
        elif weights != "none":
            if meta is not None:  # a petah file holds the model as saved: already reparameterized
                _reparameterize(model)
                folded = True
            _load_into(model, read_state_dict(weights), f"in {weights}")
    source: dict = {"weights": weights}
    if meta is not None:
        source.update({k: meta[k] for k in ("source_data", "command", "metrics", "pruning") if k in meta})
    if not folded:  # timm's reparameterize is not idempotent (RepMixer drops its branches)
        _reparameterize(model)
    model.eval()
    model.requires_grad_(False)
    cfg = model.pretrained_cfg
    return Backbone(
        model=model,
        name=name,
        img_size=size,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        fingerprint=fingerprint(model),
        source=source,
        weights_bytes=fp32_safetensors_bytes(model),
        architecture=architecture,
    )


def _reparameterize(model: nn.Module) -> None:
    """Fold train-time branches (FastViT, MobileOne…) before anything is adapted or hashed."""
    if any(hasattr(m, "reparameterize") for m in model.modules()):
        from timm.utils.model import reparameterize_model

        reparameterize_model(model, inplace=True)


def save_backbone(backbone: Backbone, path: str | Path, extra: dict | None = None,
                  dtype: torch.dtype = torch.float32) -> Path:
    """Write a backbone file: safetensors weights + JSON metadata (name, size, fingerprint…)."""
    state = {
        k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
        for k, v in backbone.model.state_dict().items()
    }
    meta = {"name": backbone.name, "img_size": backbone.img_size, **(extra or {})}
    if backbone.architecture is not None:
        meta["architecture"] = backbone.architecture
    # The fingerprint is of the weights as they load back (after any dtype round trip).
    reloaded = {k: v.to(backbone.model.state_dict()[k].dtype) for k, v in state.items()}
    meta["fingerprint"] = tensors_sha256(reloaded)
    payload = save(state, metadata={"format": BACKBONE_FORMAT, "petah": json.dumps(meta)})
    return atomic_write_bytes(Path(path), payload)



def resolve_backbone(spec: str | Path, weights: str = "none", img_size: int | None = None) -> Backbone:
    """A backbone from what a user names: a petah backbone file (``.safetensors``: it carries its
    timm name and input size; ``weights`` is then ignored) or a timm model name with ``weights``
    (none | hub | a weights file) and ``img_size``."""
    spec = str(spec)
    if Path(spec).suffix == ".safetensors":
        if not Path(spec).is_file():
            raise PetahError(f"backbone file not found: {spec}")
        return create_backbone(img_size=img_size, weights=spec)
    return create_backbone(spec, img_size, weights)


__all__ = ["Backbone", "create_backbone", "fingerprint", "read_backbone_metadata", "resolve_backbone", "save_backbone"]
