"""The multi-task runtime: one backbone, several packages, switching, merged mode, rollback."""

import numpy as np
import pytest
import torch

from conftest import perturb_adapters, write_pattern_folder
from petah import api
from petah.backbones import create_backbone
from petah.data import load_dataset
from petah.errors import PetahError
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.testing import synthetic_package
from petah.train import TrainConfig


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime")
    folder = write_pattern_folder(root / "shapes", 8, seed=7)
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", 32)
    train, val = load_dataset(str(folder), val_split=0.25)
    packages = {}
    for name, plan in [("a", PlanConfig()), ("b", PlanConfig(rank=4, task_norm="stats")),
                       ("c", PlanConfig(preset="bitfit"))]:
        torch.manual_seed(1)
        result = api.adapt(backbone, train, val, plan=plan, config=TrainConfig(max_steps=3, batch_size=8, lr=1e-2),
                           task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        packages[name] = api.save_package(result, root / f"{name}.petah")
    return {"backbone": backbone, "packages": packages, "val": val, "root": root}


def _reference(backbone, package, x):
    task = api.load_task(backbone, package)
    with torch.no_grad():
        return task.model(x)


def test_switching_tasks_matches_each_task_alone(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = api.open_runtime(backbone, packages.values())
    x = torch.randn(3, 3, 32, 32)
    expected = {name: _reference(backbone, path, x) for name, path in packages.items()}
    for name in ["a", "b", "c", "a", "c", "b"]:  # back and forth
        torch.testing.assert_close(runtime.forward(x, name), expected[name], rtol=1e-4, atol=1e-5)
    # the resident backbone is shared, not copied per task
    before = sum(p.numel() for p in backbone.model.parameters())
    assert sum(p.numel() for p in runtime.backbone.model.parameters()) < before * 1.3


def test_merged_mode_equals_unmerged(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = api.open_runtime(backbone, packages.values())
    x = torch.randn(2, 3, 32, 32)
    unmerged = {name: runtime.forward(x, name) for name in packages}
    runtime.set_mode("merged")
    for name in ["b", "a", "c", "a"]:
        out = runtime.forward(x, name)
        assert runtime.tasks[name].adapter.merged or not runtime.tasks[name].adapter.targets
        torch.testing.assert_close(out, unmerged[name], rtol=1e-4, atol=1e-4)
    runtime.set_mode("unmerged")
    torch.testing.assert_close(runtime.forward(x, "a"), unmerged["a"], rtol=1e-5, atol=1e-5)


def test_unload_restores_the_plain_backbone(setup):
    backbone, packages = setup["backbone"], setup["packages"]
    runtime = Runtime(backbone)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = runtime.backbone.model(x)
    for path in packages.values():
        runtime.load(path)
    runtime.forward(x, "b")
    for name in list(runtime.tasks):
        runtime.unload(name)
    assert not any(hasattr(m, "lora_A") or hasattr(m, "deltas") for m in runtime.backbone.model.modules())
    with torch.no_grad():
        torch.testing.assert_close(runtime.backbone.model(x), plain, rtol=0, atol=0)


def test_mismatched_package_is_refused_while_others_serve(setup, tmp_path):
    backbone, packages = setup["backbone"], setup["packages"]
    other = create_backbone("efficientformerv2_s0", 64)
    train, val = load_dataset(str(setup["root"] / "shapes"), val_split=0.25)
    foreign = api.save_package(api.adapt(other, train, val, plan=PlanConfig(), config=TrainConfig(max_steps=1,
                               batch_size=8), task_name="foreign"), tmp_path / "f.petah")
    runtime = Runtime(backbone)
    runtime.load(packages["a"])
    x = torch.randn(1, 3, 32, 32)
    before = runtime.forward(x, "a")
    with pytest.raises(PetahError, match="trained on efficientformerv2_s0@64px"):
        runtime.load(foreign)
    assert list(runtime.tasks) == ["a"]
    torch.testing.assert_close(runtime.forward(x, "a"), before, rtol=0, atol=0)


def test_failed_reload_rolls_back_and_good_reload_replaces(setup, tmp_path):
    from petah.packages.format import read_package

    backbone, packages = setup["backbone"], setup["packages"]
    runtime = Runtime(backbone)
    runtime.load(packages["a"])
    x = torch.randn(1, 3, 32, 32)
    before = runtime.forward(x, "a")
    # a newer "a" whose adapter tensors do not fit the layers: the load fails half-way
    broken = read_package(packages["a"])
    key = next(k for k in broken.tensors if k.endswith("lora_A"))
    broken.tensors[key] = np.zeros((3, 3), np.float32)
    with pytest.raises(PetahError):
        runtime.load(broken)
    torch.testing.assert_close(runtime.forward(x, "a"), before, rtol=0, atol=0)
    assert all(len(m.lora_A) == 1 for m in runtime.backbone.model.modules() if hasattr(m, "lora_A"))
    # a good newer version (here: package b under the name a) replaces it
    runtime.load(packages["b"], name="a")
    torch.testing.assert_close(runtime.forward(x, "a"), _reference(backbone, packages["b"], x), rtol=1e-4, atol=1e-5)


def test_run_decodes_every_task(setup):
    runtime = api.open_runtime(setup["backbone"], setup["packages"].values())
    images = setup["val"].images[:4]
    results = runtime.run(images)
    assert set(results) == {"a", "b", "c"} and all(len(v) == 4 for v in results.values())
    with pytest.raises(PetahError, match="no task 'zzz'"):
        runtime.activate("zzz")


def test_shared_trunk_runs_unadapted_stages_once_with_equal_results(setup, tmp_path, monkeypatch):
    backbone = setup["backbone"]
    train, val = load_dataset(str(setup["root"] / "shapes"), val_split=0.25)
    runtime = Runtime(backbone)
    for name, stages in [("late1", {0: 0, 1: 0}), ("late2", {0: 0, 1: 0, 2: 0})]:
        torch.manual_seed(2)
        result = api.adapt(backbone, train, val, plan=PlanConfig(stage_ranks=stages), config=TrainConfig(max_steps=2,
                           batch_size=8), task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        runtime.load(api.save_package(result, tmp_path / f"{name}.petah"))
    runtime.load(setup["packages"]["a"])  # adapts every stage: not loaded for the shared run
    assert runtime.shared_stages(["late1", "late2"]) == 2
    assert runtime.shared_stages(["late1", "a"]) == 0
    x = torch.randn(3, 3, 32, 32)
    runtime.activate("a")  # the trunk must not run with another task's adapters
    calls = {"n": 0}
    stem_forward = runtime.backbone.model.stem.forward
    monkeypatch.setattr(runtime.backbone.model.stem, "forward",
                        lambda t: (calls.__setitem__("n", calls["n"] + 1), stem_forward(t))[1])
    shared = runtime.forward_many(x, ["late1", "late2"])
    assert calls["n"] == 1
    for mode in ("unmerged", "merged"):
        runtime.set_mode(mode)
        for name in ("late1", "late2"):
            torch.testing.assert_close(shared[name], runtime.forward(x, name), rtol=1e-4, atol=1e-4)


def test_staged_install_leaves_the_live_model_alone_until_installed(setup):
    """prepare(stage=True) adds the adapters to a shadow (a server does it beside running batches):
    the live outputs do not move until install, which then equals a cold load; a shadow made stale
    by another change falls back to the cold path."""
    backbone, packages = setup["backbone"], setup["packages"]
    extra = synthetic_package(backbone, "d", PlanConfig(rank=2), classes=3, seed=4)
    x = torch.randn(2, 3, 32, 32)
    runtime, reference = Runtime(backbone), Runtime(backbone)
    for rt in (runtime, reference):
        rt.load(packages["a"])
        rt.load(packages["b"])  # owns norm statistics: never staged
    before = runtime.forward_many(x, ["a", "b"])
    prepared = runtime.prepare(extra, stage=True)
    assert prepared.staged is not None and runtime.prepare(packages["b"], stage=True).staged is None
    during = runtime.forward_many(x, ["a", "b"])
    assert all(torch.equal(before[n], during[n]) for n in before)
    runtime.install(prepared)
    reference.load(extra)
    got, want = runtime.forward_many(x, ["a", "b", "d"]), reference.forward_many(x, ["a", "b", "d"])
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)
    stale = runtime.prepare(packages["a"], stage=True)
    runtime.unload("d")  # changes the structure after the shadow was taken
    runtime.install(stale)
    reference.unload("d")
    reference.load(packages["a"])
    got, want = runtime.forward_many(x, ["a", "b"]), reference.forward_many(x, ["a", "b"])
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_the_device_gate_scores_what_the_torch_gate_scores(tmp_path):
    """The same golden set, the same package: the device engine's accuracy is the torch runtime's."""
    from PIL import Image

    from conftest import make_pattern
    from petah.backbones import demo_backbone_path
    from petah.fleet.gate import score_versions
    from petah.serve import demo_device_backbone, demo_packages
    from petah.serve.engine import DeviceEngine

    digits = next(p for p in demo_packages() if p.stem == "digits")
    golden = tmp_path / "golden"
    for label in range(10):
        (golden / "digits" / str(label)).mkdir(parents=True)
        for i in range(2):
            pattern = make_pattern(label, size=64, seed=i)
            Image.fromarray(pattern).save(golden / "digits" / str(label) / f"{i}.png")
    device = demo_device_backbone()
    on_device = score_versions(device, {"v": digits}, golden, DeviceEngine(device, threads=1))["v"]
    with_torch = score_versions(create_backbone(weights=str(demo_backbone_path())), {"v": digits}, golden)["v"]
    assert (on_device.metric, on_device.value) == (with_torch.metric, with_torch.value)


def test_tasks_that_leave_the_early_stages_alone_share_one_trunk_on_the_device():
    """Budget plans give early stages rank 0: the device engine runs that part once for all such
    tasks (weights held once) and each task's own part after it; answers as the torch runtime's."""
    from petah.backbones import demo_backbone_path
    from petah.device import decode
    from petah.runtime.attach import load_task
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = create_backbone(weights=str(demo_backbone_path()))
    late = PlanConfig(stage_ranks={0: 0, 1: 0, 2: 0})
    packages = {f"late{i}": synthetic_package(backbone, f"late{i}", late, classes=4, seed=i) for i in range(2)}
    packages["all"] = synthetic_package(backbone, "all", PlanConfig(), classes=4, seed=3)
    engine = DeviceEngine(demo_device_backbone(), threads=1)
    for name, package in packages.items():
        engine.install(engine.prepare(package, name))
    held = {name: engine.held(name) for name in packages}
    assert held["late0"]["form"] == "shared trunk + merged" and held["late0"]["trunk_tasks"] == 2
    assert engine.tasks["late0"].merged.trunk is engine.tasks["late1"].merged.trunk and len(engine.trunks) == 1
    assert held["all"]["form"] == "merged"  # its first stage is adapted: nothing to share
    assert held["late0"]["own_bytes"] + held["late0"]["trunk_bytes"] <= held["all"]["own_bytes"]
    images = [np.random.default_rng(i).integers(0, 256, (3, 64, 64), dtype=np.uint8) for i in range(3)]
    answers = engine.run(images, list(packages), top_k=4)
    x = torch.stack([backbone_input(backbone, image) for image in images])
    for name, package in packages.items():
        with torch.no_grad():
            logits = load_task(backbone, package).model(x).numpy()
        want = decode.classification(logits, [str(i) for i in range(4)], 4)
        got = answers[name]
        assert [row["label"] for row in got] == [row["label"] for row in want]
        assert all(abs(a["score"] - b["score"]) < 1e-4 for g, w in zip(got, want, strict=True)
                   for a, b in zip(g["top"], w["top"], strict=True))
    engine.unload("late0")
    assert len(engine.trunks) == 1
    engine.unload("late1")
    assert not engine.trunks


def backbone_input(backbone, image: np.ndarray) -> torch.Tensor:
    from petah.data import Preprocess

    return Preprocess(backbone.img_size, backbone.mean, backbone.std)(torch.from_numpy(image))


def test_the_device_gate_scores_a_task_that_runs_on_a_shared_trunk(tmp_path):
    from PIL import Image

    from conftest import make_pattern
    from petah.backbones import demo_backbone_path
    from petah.fleet.gate import score_versions
    from petah.packages import write_package
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = create_backbone(weights=str(demo_backbone_path()))
    late = synthetic_package(backbone, "late", PlanConfig(stage_ranks={0: 0, 1: 0, 2: 0}), classes=2)
    path = write_package(tmp_path / "late.petah", late)
    for label in ("0", "1"):
        (tmp_path / "golden" / "late" / label).mkdir(parents=True)
        Image.fromarray(make_pattern(int(label), size=64)).save(tmp_path / "golden" / "late" / label / "a.png")
    device = demo_device_backbone()
    engine = DeviceEngine(device, threads=1)
    assert engine.prepare(path, None).merged.trunk is not None
    on_device = score_versions(device, {"v": path}, tmp_path / "golden", engine)["v"]
    with_torch = score_versions(backbone, {"v": path}, tmp_path / "golden")["v"]
    assert (on_device.metric, on_device.value) == (with_torch.metric, with_torch.value)
