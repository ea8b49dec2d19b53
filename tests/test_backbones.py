import pytest
import torch
from safetensors.torch import save_file

from conftest import FAMILY_MODELS
from petah.backbones import create_backbone, fingerprint, read_backbone_metadata, save_backbone
from petah.errors import PetahError


def test_fingerprint_is_stable_and_sensitive(tmp_path):
    torch.manual_seed(0)
    a = create_backbone("efficientformerv2_s0", 64)
    path = save_backbone(a, tmp_path / "bb.safetensors", {"source_data": "test"})
    b = create_backbone(weights=str(path))
    assert b.fingerprint == a.fingerprint == fingerprint(b.model)
    assert read_backbone_metadata(path)["fingerprint"] == a.fingerprint
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert fingerprint(b.model) != a.fingerprint


@pytest.mark.parametrize("name,size", FAMILY_MODELS)
def test_backbone_file_round_trip_every_family(name, size, tmp_path):
    # FastViT is reparameterized when built: its file holds the folded convs and must load as such
    torch.manual_seed(0)
    a = create_backbone(name, size)
    b = create_backbone(weights=str(save_backbone(a, tmp_path / "bb.safetensors")))
    assert b.fingerprint == a.fingerprint
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert torch.equal(a.model(x), b.model(x))


def test_fingerprint_excludes_classifier_and_records_size(tmp_path):
    torch.manual_seed(0)
    a = create_backbone("mobilenetv3_small_050", 64)
    assert not any(k.startswith("classifier") for k in a.model.state_dict())
    assert a.identity()["img_size"] == 64 and a.weights_bytes > 0


def test_fp16_backbone_file_fingerprint_matches_reload(tmp_path):
    a = create_backbone("efficientformerv2_s0", 64)
    path = save_backbone(a, tmp_path / "half.safetensors", dtype=torch.float16)
    meta = read_backbone_metadata(path)
    assert create_backbone(weights=str(path)).fingerprint == meta["fingerprint"]


def test_efficientformer_v1_is_fixed_at_224():
    with pytest.raises(PetahError, match="only at 224"):
        create_backbone("efficientformer_l1", 128)


def test_v2_weights_from_another_size_resize_bias_tables(tmp_path):
    torch.manual_seed(0)
    small = create_backbone("efficientformerv2_s0", 64)
    path = tmp_path / "s0_64.pth"
    torch.save(small.model.state_dict(), path)  # a plain torch state dict
    big = create_backbone("efficientformerv2_s0", 128, weights=str(path))
    key = "stages.3.downsample.attn.attention_biases"
    assert small.model.state_dict()[key].shape[1] == 16
    assert big.model.state_dict()[key].shape[1] == 64
    # every other tensor is the loaded one
    sd_small, sd_big = small.model.state_dict(), big.model.state_dict()
    same = [k for k in sd_small if "attention_biases" not in k]
    assert all(torch.equal(sd_small[k], sd_big[k]) for k in same)
    with torch.no_grad():
        assert big.model(torch.randn(1, 3, 128, 128)).shape == (1, small.num_features)


def test_classifier_keys_of_a_full_checkpoint_are_dropped(tmp_path):
    import timm

    full = timm.create_model("resnet10t", num_classes=7)
    path = tmp_path / "resnet.safetensors"
    save_file(full.state_dict(), str(path))
    backbone = create_backbone("resnet10t", 64, weights=str(path))
    assert torch.equal(backbone.model.state_dict()["conv1.0.weight"], full.state_dict()["conv1.0.weight"])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="not_a_model"), "unknown timm model"),
        (dict(name="resnet10t", weights="missing.safetensors"), "not found"),
        (dict(name="efficientformerv2_s0", img_size=50), "multiple of 32"),
    ],
)
def test_bad_backbone_requests(kwargs, message):
    with pytest.raises(PetahError, match=message):
        create_backbone(**kwargs)


def test_weights_of_another_model_are_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file(create_backbone("resnet10t", 64).model.state_dict(), str(path))
    with pytest.raises(PetahError, match="do not"):
        create_backbone("efficientformerv2_s0", 64, weights=str(path))


def test_hub_failure_is_one_clear_error(monkeypatch):
    import timm

    real = timm.create_model

    def offline(*args, pretrained=False, **kwargs):
        if pretrained:
            raise ConnectionError("no network")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(PetahError, match="cannot fetch hub weights"):
        create_backbone("resnet10t", 64, weights="hub")
