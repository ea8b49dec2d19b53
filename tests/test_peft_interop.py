"""PEFT folders: petah -> PEFT (loaded by PEFT itself) -> petah, and folders made with PEFT by hand."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from petah.api import load_task
from petah.backbones import create_backbone
from petah.errors import PetahError
from petah.export.peft_interop import export_peft, import_peft
from petah.plans import PlanConfig
from petah.testing import synthetic_package

SIZE = 64


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("efficientformerv2_s0", SIZE)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _peft_model(backbone, folder, classes):
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(classes)
    return PeftModel.from_pretrained(model, str(folder))


@pytest.mark.parametrize("plan", [
    PlanConfig(),  # LoRA + depthwise ChannelScale (-> modules_to_save)
    PlanConfig(preset="attn-lora", stage_ranks={0: 0, 1: 2}),  # per-stage ranks -> rank/alpha patterns
    PlanConfig(rank=4, task_norm="stats"),  # task-owned BatchNorms -> modules_to_save
], ids=["petah", "attn-lora-stage-ranks", "task-norm-stats"])
def test_round_trip_through_peft(backbone, plan, tmp_path):
    package = synthetic_package(backbone, "parts", plan, classes=5)
    x = torch.randn(3, 3, SIZE, SIZE)
    reference = _logits(load_task(backbone, package).model, x)

    result = export_peft(backbone, package, tmp_path / "parts")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(result["files"])
    assert result["max_abs_error"] < 1e-5
    by_peft = _logits(_peft_model(backbone, tmp_path / "parts", 5), x)  # PEFT alone, as a user would load it
    assert torch.allclose(by_peft, reference, atol=1e-5)

    imported, info = import_peft(backbone, tmp_path / "parts", adapter_dtype="float32")
    assert info["backbone_checked"] and info["max_abs_error"] < 1e-5
    assert imported.manifest.labels == package.manifest.labels
    assert torch.allclose(_logits(load_task(backbone, imported).model, x), reference, atol=1e-5)


@pytest.mark.parametrize("name,size,lora", [
    # suffix list, a per-layer rank and rsLoRA scaling: PEFT's own matching and scaling rules
    ("efficientformerv2_s0", SIZE, dict(target_modules=["fc1.conv", "fc2.conv", "q.conv"], r=4, lora_alpha=8,
                                         rank_pattern={"stages.3.blocks.0.mlp.fc1.conv": 2}, use_rslora=True)),
    ("vit_tiny_patch16_224", 32, dict(target_modules=["qkv", "proj"], r=2, lora_alpha=4)),
])
def test_import_a_folder_made_with_peft_by_hand(name, size, lora, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(name, size)
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(4)
    classifier = backbone.model.pretrained_cfg["classifier"]
    classifier = [classifier] if isinstance(classifier, str) else list(classifier)
    peft_model = get_peft_model(model, LoraConfig(**lora, modules_to_save=classifier))
    with torch.no_grad():  # as if trained: B is zero at init
        for _key, param in peft_model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(str(tmp_path / "by-hand"))
    x = torch.randn(2, 3, size, size)

    package, info = import_peft(backbone, tmp_path / "by-hand", labels=list("abcd"), adapter_dtype="float32")
    assert not info["backbone_checked"]  # a hand-made folder names no fingerprint
    assert info["lora_layers"] == sum(1 for k in peft_model.state_dict() if k.endswith("lora_A.default.weight"))
    assert torch.allclose(_logits(load_task(backbone, package).model, x), _logits(peft_model, x), atol=1e-5)
    assert package.manifest.labels == list("abcd")


def test_bad_folders_and_plans_are_refused(backbone, tmp_path):
    package = synthetic_package(backbone, "parts", PlanConfig(preset="attn-lora"), classes=3)
    folder = tmp_path / "f"
    export_peft(backbone, package, folder)

    other = create_backbone("efficientformerv2_s0", SIZE)  # other random weights: another fingerprint
    with pytest.raises(PetahError, match="was trained on efficientformerv2_s0"):
        import_peft(other, folder)

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(PetahError, match="LoRA adapters only"):
        import_peft(backbone, folder)
    (folder / "adapter_config.json").write_text(json.dumps({**config, "modules_to_save": None}))
    (folder / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(PetahError, match="not a readable safetensors"):
        import_peft(backbone, folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(PetahError, match="adapter_config.json is missing"):
        import_peft(backbone, folder)

    for preset, message in (("full", "not an adapter"), ("linear-probe", "no LoRA layers")):
        with pytest.raises(PetahError, match=message):
            export_peft(backbone, synthetic_package(backbone, preset, PlanConfig(preset=preset)), tmp_path / preset)
        assert not (tmp_path / preset).exists()


def test_classifier_must_be_saved(backbone, tmp_path):
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(3)
    peft_model = get_peft_model(model, LoraConfig(target_modules=["fc1.conv"], r=2, modules_to_save=["head"]))
    peft_model.save_pretrained(str(tmp_path / "half"))  # head without head_dist: V2 averages both
    with pytest.raises(PetahError, match=r"classifier \(head, head_dist\) must be in modules_to_save; found head"):
        import_peft(backbone, tmp_path / "half")


def test_export_never_overwrites_a_folder_that_is_not_a_peft_folder(backbone, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    package = synthetic_package(backbone, "parts", PlanConfig(preset="attn-lora"), classes=3)
    with pytest.raises(PetahError, match="is not a PEFT adapter folder"):
        export_peft(backbone, package, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temp folder left behind
