"""Merge / unmerge exactness for every plan x family (table-driven over tiny inputs)."""

import pytest
import torch

from conftest import FAMILY_MODELS, wake_zero_init_scales
from petah.adapters import TaskAdapter, refresh_attention_caches
from petah.adapters.targets import is_grouped
from petah.backbones import create_backbone
from petah.errors import PetahError
from petah.plans import CHANNEL_SCALE, FAMILIES, LORA, PRESETS, PlanConfig, family_for


def test_every_family_is_covered():
    assert {family_for(name).name for name, _ in FAMILY_MODELS} == {f.name for f in FAMILIES}


def _perturb(adapter: TaskAdapter, scale: float = 0.05) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    refresh_attention_caches(adapter.model)


@pytest.mark.parametrize("name,size", FAMILY_MODELS)
@pytest.mark.parametrize("preset", PRESETS)
def test_merge_unmerge_exact(name, size, preset):
    torch.manual_seed(0)
    backbone = create_backbone(name, size)
    wake_zero_init_scales(backbone.model)
    family = family_for(name)
    original = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        base = backbone.model(x)
    if preset == "attn-lora" and not family.has_attention:
        with pytest.raises(PetahError, match="needs attention layers"):
            TaskAdapter(backbone, PlanConfig(preset=preset))
        return
    adapter = TaskAdapter(backbone, PlanConfig(preset=preset))
    if preset == "petah":
        methods = {t.method for t in adapter.targets}
        assert LORA in methods
        has_grouped = any(is_grouped(m) for m in backbone.model.modules())
        assert (CHANNEL_SCALE in methods) == has_grouped
    _perturb(adapter)
    backbone.model.eval()
    with torch.no_grad():
        unmerged = backbone.model(x)
        adapter.merge()
        merged = backbone.model(x)
        adapter.unmerge()
        again = backbone.model(x)
    activation_space = backbone.model(x).detach()  # grad enabled: PEFT's forward, not weight space
    delta = (unmerged - base).norm()
    if preset == "linear-probe":
        assert delta == 0 and torch.equal(merged, unmerged)
    else:
        assert delta > 1e-4, "non-zero adapters must change the features"
        assert ((merged - unmerged).norm() / delta) < 1e-3
        assert ((again - unmerged).norm() / delta) < 1e-3
        assert ((activation_space - unmerged).norm() / delta) < 1e-3
    adapter.restore_overrides()
    restored = adapter.backbone_weights()
    assert set(restored) == set(original)
    worst = max((restored[k].float() - original[k].float()).abs().max().item() for k in original)
    assert worst < 1e-6


def test_stage_ranks_and_rank_override():
    backbone = create_backbone("efficientformerv2_s0", 64)
    adapter = TaskAdapter(backbone, PlanConfig(rank=4, stage_ranks={0: 0, 3: 16}))
    stages = {t.module: (backbone.family.stage_of(t.module), t.rank) for t in adapter.targets}
    assert all(stage != 0 for stage, _ in stages.values())
    lora_ranks = {t.rank for t in adapter.targets if t.method == LORA and backbone.family.stage_of(t.module) == 3}
    assert lora_ranks == {16}
    layer = backbone.model.get_submodule(next(t.module for t in adapter.targets if t.method == LORA and t.rank == 16))
    assert layer.lora_A["default"].weight.shape[0] == 16


def test_unknown_family_needs_targets():
    backbone = create_backbone("convnext_atto", 64)
    with pytest.raises(PetahError, match="--target"):
        TaskAdapter(backbone, PlanConfig())
    adapter = TaskAdapter(backbone, PlanConfig(targets=[r"\.mlp\.fc[12]$"]))
    assert adapter.targets and all(".mlp.fc" in t.module for t in adapter.targets)


def test_lora_targets_match_exact_names_only():
    # resnet's stem conv is named "conv1", a suffix of every block's "layerN.M.conv1"
    backbone = create_backbone("resnet10t", 64)
    adapter = TaskAdapter(backbone, PlanConfig(stage_ranks={1: 0, 2: 0, 3: 0, 4: 0}))
    adapted = {n for n, m in backbone.model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {t.module for t in adapter.targets}
    assert not any(n.startswith("layer") for n in adapted)


def test_inference_builds_weights_once_per_lora_layer_and_training_keeps_peft(monkeypatch):
    from peft.tuners.lora import LoraLayer

    import petah.adapters.inference as inference

    backbone = create_backbone("efficientformerv2_s0", 64)
    adapter = TaskAdapter(backbone, PlanConfig())
    assert not any(layer.training for layer in adapter.adapted_layers()), "new layers follow the model's eval mode"
    calls = []
    real = inference.delta_weight
    monkeypatch.setattr(inference, "delta_weight", lambda layer, name: calls.append(name) or real(layer, name))
    lora_layers = sum(isinstance(m, LoraLayer) for m in backbone.model.modules())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        backbone.model(x)
    assert len(calls) == lora_layers > 0
    backbone.model.train()
    backbone.model(x).sum().backward()  # training: PEFT's activation-space branch, gradients reach A and B
    assert len(calls) == lora_layers
    assert all(p.grad is not None for p in adapter.trainable_parameters() if p.ndim > 1)
