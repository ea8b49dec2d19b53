"""Pruning the shared backbone: rebuild from file, shapes per family, head pruning, the workflow, errors."""

import copy
import json

import pytest
import torch
from safetensors import safe_open

from conftest import one_json, petah_process
from petah import api
from petah.backbones import create_backbone
from petah.backbones.features import feature_levels
from petah.data import load_builtin, load_dataset
from petah.errors import PetahError
from petah.plans import PlanConfig
from petah.prune import PruneConfig
from petah.prune.attention import prune_heads
from petah.train import TrainConfig

PRUNABLE_MODELS = [
    ("efficientformerv2_s0", 64),
    ("efficientformer_l1", 224),
    ("mobilenetv3_small_050", 64),
    ("resnet10t", 64),
]


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name,size", PRUNABLE_MODELS)
def test_pruned_backbone_rebuilds_from_its_file_bit_exactly(name, size, tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone(name, size)
    x = torch.randn(2, 3, size, size)
    for ratio in (0.25, 0.5):
        pruned, report = api.prune_backbone(backbone, config=PruneConfig(ratio=ratio, importance="magnitude"))
        assert report["pruned"]["params"] < report["base"]["params"]
        assert report["pruned"]["macs"] < report["base"]["macs"]
        path = api.save_pruned(pruned, report, tmp_path / f"{name}-{ratio}.safetensors")
        with safe_open(str(path), framework="pt") as handle:  # the architecture is JSON in the header
            meta = json.loads(handle.metadata()["petah"])
        assert meta["architecture"]["modules"] and meta["pruning"]["config"]["ratio"] == ratio
        reloaded = create_backbone(weights=str(path))
        assert reloaded.pruned and reloaded.fingerprint == pruned.fingerprint != backbone.fingerprint
        assert _state_equal(reloaded.model, pruned.model)
        with torch.no_grad():
            out = reloaded.model(x)
            assert torch.equal(out, pruned.model(x))
            assert out.shape == (2, reloaded.num_features) and reloaded.num_features < backbone.num_features
            maps = reloaded.model.forward_intermediates(x, intermediates_only=True)
        levels = feature_levels(reloaded.model)  # dense heads size their laterals from these
        assert [m.shape[1] for m in maps] == [lv["num_chs"] for lv in levels]
        assert [m.shape[-1] for m in maps] == [size // lv["reduction"] for lv in levels]
    assert backbone.fingerprint == api.fingerprint(backbone.model)


def _attention_cases():
    from timm.models.efficientformer import Attention
    from timm.models.efficientformer_v2 import Attention2d, Attention2dDownsample

    return [
        ("v2-attention", lambda: Attention2d(dim=32, key_dim=8, num_heads=4, attn_ratio=2,
                                             resolution=4), (2, 32, 4, 4)),
        ("v2-attention-strided", lambda: Attention2d(dim=32, key_dim=8, num_heads=4, attn_ratio=2,
                                                     resolution=8, stride=2), (2, 32, 8, 8)),
        ("v2-downsample", lambda: Attention2dDownsample(dim=32, key_dim=8, num_heads=4, attn_ratio=2,
                                                        resolution=8, out_dim=48), (2, 32, 8, 8)),
        ("v1-attention", lambda: Attention(dim=32, key_dim=8, num_heads=4, attn_ratio=2, resolution=4), (2, 16, 32)),
    ]


@pytest.mark.parametrize("case", _attention_cases(), ids=lambda c: c[0])
def test_head_pruning_keeps_the_other_heads_outputs(case):
    """Silence heads 1 and 3 (nothing flows from them to the output): removing them changes nothing."""
    _, build, shape = case
    torch.manual_seed(0)
    layer = build()
    layer.eval()  # timm's attention train() returns None: no chaining
    drop = [1, 3]
    with torch.no_grad():
        layer.attention_biases.normal_()
        if hasattr(layer, "talking_head1"):  # talking heads mix heads: cut what the dropped ones feed
            for talk in (layer.talking_head1, layer.talking_head2):
                for h in drop:
                    talk.weight[:, h] = 0
        proj = layer.proj.weight if isinstance(layer.proj, torch.nn.Linear) else layer.proj.conv.weight
        per_head = proj.shape[1] // layer.num_heads
        for h in drop:
            proj[:, h * per_head:(h + 1) * per_head] = 0
        x = torch.randn(shape)
        before = layer(x)
        prune_heads(layer, drop)
        assert layer.num_heads == 2 and layer.attention_biases.shape[0] == 2
        assert torch.allclose(layer(x), before, atol=1e-5)
        layer.train()  # the training path (bias table gathered afresh, no cache) agrees too
        for norm in layer.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.eval()  # (with the same normalisation as before)
        assert torch.allclose(layer(x), before, atol=1e-5)


@pytest.mark.parametrize("case", _attention_cases(), ids=lambda c: c[0])
def test_attention_channel_pruners_cut_the_residual_stream_consistently(case):
    """What Torch-Pruning asks of an opaque attention block: drop input and output channels. With
    those input channels unused (zero weights), the kept outputs are exactly the old ones."""
    from petah.prune.attention import ATTENTION_PRUNERS

    _, build, shape = case
    torch.manual_seed(0)
    layer = build()
    layer.eval()
    pruner = ATTENTION_PRUNERS[type(layer)]
    drop = [0, 5, 17]
    channel_dim = 1 if len(shape) == 4 else 2
    with torch.no_grad():
        for first in pruner.input_layers(layer):  # V2's strided / local query paths only feed these
            first.weight[:, drop] = 0
        x = torch.randn(shape)
        x.index_fill_(channel_dim, torch.tensor(drop), 0.0)
        keep = [c for c in range(shape[channel_dim]) if c not in drop]
        keep_out = [c for c in range(pruner.get_out_channels(layer)) if c not in drop]
        before = layer(x).index_select(channel_dim, torch.tensor(keep_out))
        pruner.prune_in_channels(layer, drop)
        pruner.prune_out_channels(layer, drop)
        assert pruner.get_in_channels(layer) == shape[channel_dim] - 3
        after = layer(x.index_select(channel_dim, torch.tensor(keep)))
    assert torch.allclose(after, before, atol=1e-5)


def test_heads_removed_at_the_ratio_and_channels_per_group():
    backbone = create_backbone("efficientformerv2_s0", 64)
    pruned, report = api.prune_backbone(backbone, config=PruneConfig(ratio=0.5, importance="magnitude"))
    heads = {n: m.num_heads for n, m in backbone.model.named_modules() if hasattr(m, "attention_biases")}
    assert report["heads_removed"] == {n: h // 2 for n, h in heads.items()}
    for name, module in pruned.model.named_modules():
        if name in heads:
            assert module.num_heads == heads[name] - heads[name] // 2
    fc1 = dict(backbone.model.named_modules())["stages.0.blocks.0.mlp.fc1.conv"]
    assert dict(pruned.model.named_modules())["stages.0.blocks.0.mlp.fc1.conv"].out_channels == fc1.out_channels // 2
    only_channels, report = api.prune_backbone(backbone, config=PruneConfig(ratio=0.5, head_ratio=0.0,
                                               importance="magnitude"))
    assert report["heads_removed"] == {}


def test_multi_task_taylor_importance_and_recovery(image_folder):
    """Taylor importance from a classification and a segmentation set at once; recovery distils."""
    backbone = create_backbone("efficientformerv2_s0", 64)
    shapes = load_dataset(str(image_folder), val_split=0.25)[0]
    defects = load_builtin("defects")[0].split(0.95, 0)[1]  # a few images are enough here
    config = PruneConfig(ratio=0.25, calibration_batches=2, batch_size=8, recover_epochs=2)
    pruned, report = api.prune_backbone(backbone, config=config, datasets=[shapes, defects])
    assert report["images_seen"] == 2 * 8 + min(len(defects), 16)
    assert report["data"] == [shapes.source, defects.source]
    recovery = report["recovery"]
    assert recovery["steps"] > 0 and recovery["last_loss"] < recovery["first_loss"]
    assert not any(p.requires_grad or p.grad is not None for p in pruned.model.parameters())
    magnitude, _ = api.prune_backbone(backbone, config=PruneConfig(ratio=0.25, importance="magnitude"))
    assert magnitude.fingerprint != pruned.fingerprint  # the data chose other channels


def test_adapt_and_export_on_a_pruned_backbone(image_folder, tmp_path):
    from petah.export import export_merged

    backbone = create_backbone("efficientformerv2_s0", 64)
    pruned, report = api.prune_backbone(backbone, config=PruneConfig(ratio=0.5, importance="magnitude"))
    path = api.save_pruned(pruned, report, tmp_path / "pruned.safetensors")
    pruned = create_backbone(weights=str(path))
    train, val = load_dataset(str(image_folder), val_split=0.25)
    for kind_data in ((train, val), load_builtin("defects")):  # a classification and a dense head
        result = api.adapt(pruned, kind_data[0], kind_data[1], plan=PlanConfig(), config=TrainConfig(epochs=1,
                           batch_size=8, max_steps=2, progress=False), task_name="t")
        package = api.save_package(result, tmp_path / "task.petah")
    with pytest.raises(PetahError, match="trained on pruned efficientformerv2_s0.*but the backbone is "
                                         "efficientformerv2_s0"):
        api.load_task(backbone, package)
    cls = api.adapt(pruned, train, val, plan=PlanConfig(), config=TrainConfig(epochs=1, batch_size=8, max_steps=2,
                    progress=False), task_name="t")
    exported = export_merged(pruned, cls.package, tmp_path / "task.onnx")
    assert exported.max_abs_error < 1e-4


@pytest.mark.parametrize("name,size,match", [
    ("mobilevit_xxs", 64, r"layer stages\.\d\.1\.transformer\.0\.attn \(Attention\) "
                          r"has attention heads without a pruner"),
    ("efficientvit_m0", 64, r"LocalWindowAttention"),
    ("fastvit_t8", 64, r"cannot prune fastvit_t8 \(family fastvit"),
])
def test_unsupported_families_are_refused_naming_the_layer(name, size, match):
    backbone = create_backbone(name, size)
    before = backbone.fingerprint
    with pytest.raises(PetahError, match=match):
        api.prune_backbone(backbone, config=PruneConfig(ratio=0.5, importance="magnitude"))
    assert api.fingerprint(backbone.model) == before


def test_bad_settings_and_files(tmp_path):
    for ratio in (-0.1, 1.0, 1.5):
        with pytest.raises(PetahError, match=r"ratio must be in \[0, 1\)"):
            PruneConfig(ratio=ratio)
    with pytest.raises(PetahError, match=r"head ratio must be in \[0, 1\)"):
        PruneConfig(head_ratio=1.0)
    with pytest.raises(PetahError, match="unknown importance"):
        PruneConfig(importance="random")
    backbone = create_backbone("efficientformerv2_s0", 64)
    with pytest.raises(PetahError, match="taylor importance needs images"):
        api.prune_backbone(backbone, config=PruneConfig(ratio=0.5))
    pruned, report = api.prune_backbone(backbone, config=PruneConfig(ratio=0.25, importance="magnitude"))
    with pytest.raises(PetahError, match="already pruned"):
        api.prune_backbone(pruned, config=PruneConfig(ratio=0.25, importance="magnitude"))
    # an architecture may only change existing size attributes: nothing else is set from a file
    bad = copy.deepcopy(pruned)
    bad.architecture = {**pruned.architecture, "modules": {"stem.conv1.conv": {"forward": 1}}}
    path = api.save_pruned(bad, report, tmp_path / "bad.safetensors")
    with pytest.raises(PetahError, match="stem.conv1.conv.forward, which is not a size attribute"):
        create_backbone(weights=str(path))
    bad.architecture = {**pruned.architecture, "format": "other/9"}
    path = api.save_pruned(bad, report, tmp_path / "bad.safetensors")
    with pytest.raises(PetahError, match="unknown pruned-architecture format"):
        create_backbone(weights=str(path))


def test_prune_cli_then_adapt_and_inspect(tmp_path):
    out = tmp_path / "pruned.safetensors"
    summary = one_json(petah_process("prune", "-b", "efficientformerv2_s0", "--img-size", "64", "--ratio", "0.5",
                                     "--data", "builtin:digits", "--calibration-batches", "1", "-o", out, "--json"))
    assert summary["params"] < summary["base"]["params"] and summary["heads_removed"] > 0
    info = one_json(petah_process("inspect", out, "--json"))
    assert info["pruned"] and info["file_bytes"] == out.stat().st_size and info["macs"] == summary["macs"]
    package = tmp_path / "digits.petah"
    petah_process("adapt", "--backbone", out, "--data", "builtin:digits",
                  "--epochs", "1", "--max-steps", "2", "-o", package)
    refused = petah_process("eval", package, "-b", "efficientformerv2_s0", "--img-size", "64",
                            "--data", "builtin:digits", ok=False)
    assert refused.returncode == 2 and "trained on pruned" in refused.stderr
    target = tmp_path / "y.safetensors"
    for args, message in [
        (["--ratio", "1"], "ratio must be in [0, 1)"),
        (["--ratio", "0.5", "-o", tmp_path / "x.pt"], "is a .safetensors file"),
        (["--ratio", "0.5"], "taylor importance needs images"),
    ]:
        bad = petah_process("prune", "-b", "efficientformerv2_s0", "--img-size", "64", "-o", target, *args, ok=False)
        assert bad.returncode == 2 and message in bad.stderr and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert not target.exists()


def test_bench_prune_quick(tmp_path):
    report = one_json(petah_process("bench", "prune", "--quick", "-o", tmp_path, "--json"))
    rows = report["rows"]
    assert [r["ratio"] for r in rows] == [0.0, 0.25, 0.5, None]
    assert rows[-1]["label"] == "auto (max-loss 1)" and rows[-1]["stage_ratios"]  # --policy auto chose stages
    assert rows[0]["speedup"] == 1.0 and rows[0]["loss_points"] == 0.0
    assert rows[0]["params"] > rows[1]["params"] > rows[2]["params"]
    assert rows[0]["backbone_bytes"] > rows[2]["backbone_bytes"]
    assert all(set(r["tasks"]) == {"digits"} and r["ort_ms"] > 0 for r in rows)
    # pruned + int8: every row scored with its task graphs quantized, its backbone timed in int8
    assert all(r["int8_ort_ms"] > 0 and 0 <= r["tasks"]["digits"]["int8_score"] <= 1
               and r["int8_loss_points"] == round(100 * (rows[0]["mean_score"] - r["int8_mean_score"]), 2)
               for r in rows)
    orders = report["orders"]  # both orders at the largest ratio; the per-task order stores a backbone per task
    assert orders["prune_then_adapt"]["mean_score"] == rows[2]["mean_score"]
    assert set(orders["adapt_merge_prune"]["tasks"]) == {"digits"} and orders["adapt_merge_prune"]["stored_bytes"] > 0
    assert (tmp_path / "prune-accuracy-latency.png").stat().st_size > 1000
    assert json.loads((tmp_path / "bench-prune.json").read_text())["rows"] == rows


def test_stage_ratios_prune_only_their_stages_and_bad_stages_are_refused(tmp_path):
    from petah.backbones import demo_backbone_path

    backbone = create_backbone(weights=str(demo_backbone_path()))
    x = torch.zeros(1, 3, backbone.img_size, backbone.img_size)
    widths = [f.shape[1] for f in backbone.model.forward_intermediates(x, intermediates_only=True)]
    config = PruneConfig(ratio=0.0, stage_ratios=["3=0.5", "2=0"], importance="magnitude")
    pruned, report = api.prune_backbone(backbone, config=config, output=tmp_path / "p.safetensors")
    after = [f.shape[1] for f in pruned.model.forward_intermediates(x, intermediates_only=True)]
    assert after[:3] == widths[:3] and after[3] == widths[3] // 2
    assert report["heads_removed"] and all(name.startswith("stages.3") for name in report["heads_removed"])
    assert report["config"]["stage_ratios"] == {"3": 0.5, "2": 0.0}
    reread = create_backbone(weights=str(tmp_path / "p.safetensors"))  # the file rebuilds the same widths
    assert [f.shape[1] for f in reread.model.forward_intermediates(x, intermediates_only=True)] == after
    with pytest.raises(PetahError, match="has no stage 7"):
        api.prune_backbone(backbone, config=PruneConfig(stage_ratios=["7=0.5"], importance="magnitude"))
    for bad, match in ((["1=1.5"], r"ratio of stage 1 must be in \[0, 1\)"), (["one=0.5"], "STAGE=RATIO")):
        with pytest.raises(PetahError, match=match):
            PruneConfig(stage_ratios=bad)


def test_policy_choice_takes_the_largest_saving_within_the_budget():
    from petah.prune.policy import Probe, choose

    probes = [Probe(0, 0.25, 0.02, 0.05), Probe(0, 0.5, 0.05, 0.20), Probe(0, 0.75, 0.30, 0.30),
              Probe(1, 0.25, 0.01, 0.02), Probe(1, 0.5, 0.20, 0.10), Probe(1, 0.75, 0.40, 0.15)]
    chosen, spent, saving = choose(probes, [0, 1], budget=0.06)
    assert chosen == {0: 0.5, 1: 0.25} and spent == pytest.approx(0.06) and saving == pytest.approx(0.22)
    assert choose(probes, [0, 1], budget=0.0)[0] == {0: 0.0, 1: 0.0}  # nothing fits: nothing pruned
    assert choose(probes[:3], [0, 1], budget=1.0)[0] == {0: 0.75, 1: 0.0}  # stage 1 not probed: unpruned


def test_policy_auto_probes_stages_and_prunes_within_the_predicted_loss():
    from petah.backbones import demo_backbone_path

    backbone = create_backbone(weights=str(demo_backbone_path()))
    data = [load_builtin("digits")[0].subset(list(range(16))), load_builtin("textures")[0].subset(list(range(16)))]
    config = PruneConfig(policy="auto", importance="magnitude", max_loss=3.0, batch_size=8)
    pruned, report = api.prune_backbone(backbone, config=config, datasets=data)
    policy = report["policy"]
    assert policy["complete"] and len(policy["probes"]) == 4 * 3  # 4 stages x 3 ratios
    assert all(0 <= p["distortion"] <= 2 for p in policy["probes"])
    assert policy["predicted_loss_points"] <= 3.0
    assert report["config"]["stage_ratios"] == {str(k): v for k, v in policy["stage_ratios"].items()}
    assert sum(p.numel() for p in pruned.model.parameters()) <= sum(p.numel() for p in backbone.model.parameters())
    capped = api.prune_backbone(backbone, config=PruneConfig(policy="auto", importance="magnitude",
                                                             policy_seconds=1e-6, batch_size=8), datasets=data)[1]
    assert not capped["policy"]["complete"] and set(capped["policy"]["stage_ratios"].values()) == {0.0}
    with pytest.raises(PetahError, match="--data"):
        api.prune_backbone(backbone, config=PruneConfig(policy="auto", importance="magnitude"))
    with pytest.raises(PetahError, match="leave out --stage-ratio"):
        PruneConfig(policy="auto", stage_ratios=["1=0.5"])
    with pytest.raises(PetahError, match="unknown policy"):
        PruneConfig(policy="greedy")
