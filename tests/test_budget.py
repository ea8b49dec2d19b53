"""`petah adapt --budget`: budget parsing, the greedy allocation, packages that fit and stay
mergeable / exportable (merged ONNX, ORT adapters with ranks padded, PEFT rank patterns), errors."""

import itertools

import numpy as np
import pytest
import torch

from conftest import one_json, perturb_adapters, petah_process, write_pattern_folder
from petah import api
from petah.backbones import create_backbone
from petah.data import Preprocess, load_builtin
from petah.errors import PetahError
from petah.plans import LORA, PlanConfig
from petah.plans.budget import Ladder, allocate, budget_bytes
from petah.tasks import TASK_KINDS
from petah.train import TrainConfig

SIZE = 32


@pytest.mark.parametrize("text,expected", [
    ("3%", 300), ("0.5%", 50), ("400KB", 400_000), ("0.4MB", 400_000), ("250000", 250_000), ("2KiB", 2048),
    (" 1.5 kb ", 1500), ("100%", 10_000),
])
def test_budgets_in_bytes(text, expected):
    assert budget_bytes(text, backbone_bytes=10_000) == expected


@pytest.mark.parametrize("text", ["", "abc", "3 %%", "-1%", "0%", "0KB", "150%", "1e5", "3 GB", "%"])
def test_malformed_budgets_are_one_line_errors(text):
    with pytest.raises(PetahError) as caught:
        PlanConfig(budget=text)
    assert "--budget" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("options,needle", [
    ({"stage_ranks": {0: 2}}, "drop --stage-rank"),
    ({"rank": 4}, "drop --rank"),
    ({"task_norm": "stats"}, "drop --task-norm"),
    ({"preset": "attn-lora"}, "does not apply to --plan attn-lora"),
    ({"allocation": "random"}, "unknown --allocation"),
    ({"max_rank": 0}, "--max-rank"),
])
def test_budget_refuses_options_that_fix_ranks(options, needle):
    with pytest.raises(PetahError, match=needle):
        PlanConfig(budget="2%", **options)


def _brute_force(ladders, budget):
    best = 0.0
    for steps in itertools.product(*[range(len(ladder.gains) + 1) for ladder in ladders]):
        cost = sum(sum(ladder.costs[:n]) for ladder, n in zip(ladders, steps, strict=True))
        if cost <= budget:
            best = max(best, sum(sum(ladder.gains[:n]) for ladder, n in zip(ladders, steps, strict=True)))
    return best


@pytest.mark.parametrize("budget", [0, 5, 12, 20, 33, 60, 1000])
def test_greedy_allocation_takes_the_most_gain_per_byte(budget):
    ladders = [Ladder("a", (9.0, 4.0, 1.0), (4, 4, 4)),  # a wide layer: ranks cost more
               Ladder("b", (3.0, 2.5, 0.5), (1, 1, 1)),  # a narrow one
               Ladder("scale", (2.0,), (2,)),
               Ladder("norm", (10.0,), (15,)),
               Ladder("unread", (0.0, 0.0), (1, 1))]  # no gradient reaches it: never bought
    taken, spent = allocate(ladders, budget)
    assert spent <= budget
    assert spent == sum(sum(ladder.costs[:taken[ladder.name]]) for ladder in ladders)
    gain = sum(sum(ladder.gains[:taken[ladder.name]]) for ladder in ladders)
    # diminishing gains: greedy is optimal up to the one step that no longer fitted
    assert gain >= _brute_force(ladders, budget) - max(max(ladder.gains) for ladder in ladders)
    if budget >= 1000:
        assert taken == {"a": 3, "b": 3, "scale": 1, "norm": 1, "unread": 0}


@pytest.fixture(scope="module")
def budget_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", SIZE)
    train, val = load_builtin("digits")
    train, val = train.subset(range(64)), val.subset(range(32))
    config = TrainConfig(max_steps=2, batch_size=16)
    made = {}
    for name, plan in [("gradient", PlanConfig(budget="2%")),
                       ("activation", PlanConfig(budget="150KB", allocation="activation", max_rank=12)),
                       ("uniform", PlanConfig(rank=2))]:
        result = api.adapt(backbone, train, val, plan=plan, config=config, task_name=name, adapter_dtype="float32")
        perturb_adapters(result.package)
        made[name] = (result, api.save_package(result, root / f"{name}.petah"))
    real = Preprocess(SIZE, backbone.mean, backbone.std).batch(val.images[:8])
    return {"backbone": backbone, "made": made, "root": root, "real": real, "train": train, "val": val}


def test_budget_packages_fit_and_vary_ranks(budget_tasks):
    backbone = budget_tasks["backbone"]
    for name, budget in (("gradient", int(backbone.weights_bytes * 0.02)), ("activation", 150_000)):
        result, path = budget_tasks["made"][name]
        info = api.inspect_package(path)
        assert info["package_bytes"] <= budget
        assert info["package_bytes"] >= 0.85 * budget  # the budget is spent, not left unused
        ranks = {t.rank for t in result.package.manifest.plan.targets if t.method == LORA}
        assert len(ranks) > 2  # layers get their own ranks
        allocation = result.package.manifest.training["allocation"]
        assert allocation["method"] == name and allocation["budget_bytes"] == budget
        assert sum(row["rank_sum"] for row in info["stages"].values()) == \
            sum(t.rank for t in result.package.manifest.plan.targets)
    gradient = budget_tasks["made"]["gradient"][0].package.manifest
    assert gradient.plan.overrides  # it chose norm layers to own: their tensors ship
    assert budget_tasks["made"]["activation"][0].package.manifest.plan.config["override_modules"] == []


def test_budget_packages_load_merge_and_export_exactly(budget_tasks):
    from petah.export import export_merged

    backbone, real = budget_tasks["backbone"], budget_tasks["real"]
    for name in ("gradient", "activation"):
        _, path = budget_tasks["made"][name]
        task = api.load_task(backbone, path)
        with torch.no_grad():
            unmerged = task.model(real)
            task.adapter.merge()
            merged = task.model(real)
            task.adapter.unmerge()
        assert torch.allclose(unmerged, merged, atol=1e-4)
        result = export_merged(backbone, path, budget_tasks["root"] / f"{name}.onnx", real)
        assert result.max_abs_error < 1e-4


def test_ort_adapters_pad_tasks_with_other_ranks(budget_tasks, tmp_path):
    import onnxruntime as ort

    from petah.export import export_base_and_adapters

    backbone, real = budget_tasks["backbone"], budget_tasks["real"]
    paths = [budget_tasks["made"][n][1] for n in ("activation", "uniform")]
    with pytest.raises(PetahError, match="owns norm / bias tensors"):
        export_base_and_adapters(backbone, [budget_tasks["made"]["gradient"][1], paths[1]], tmp_path / "no")
    result = export_base_and_adapters(backbone, paths, tmp_path / "out", real)
    assert all(r["max_abs_error"] < 1e-4 for r in result.tasks)
    session = ort.InferenceSession(str(result.base_path), providers=["CPUExecutionProvider"])
    for name, path in zip(("activation", "uniform"), paths, strict=True):
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / "out" / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        logits = session.run(None, {"image": real.numpy()}, options)[0]
        with torch.no_grad():
            expected = api.load_task(backbone, path).model(real).numpy()
        assert np.abs(logits[:, :expected.shape[1]] - expected).max() < 1e-4


def test_peft_export_carries_per_layer_ranks(budget_tasks, tmp_path):
    import copy
    import json

    from peft import PeftModel

    from petah.export.peft_interop import export_peft, import_peft

    backbone, real = budget_tasks["backbone"], budget_tasks["real"]
    _, path = budget_tasks["made"]["gradient"]
    result = export_peft(backbone, path, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert len(set(config["rank_pattern"].values())) > 2
    model = copy.deepcopy(backbone.model)
    model.reset_classifier(10)
    by_peft = PeftModel.from_pretrained(model, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = api.load_task(backbone, path).model(real)
        assert torch.allclose(by_peft(real), expected, atol=1e-4)
    assert result["max_abs_error"] < 1e-4
    imported, _ = import_peft(backbone, tmp_path / "peft", adapter_dtype="float32")
    with torch.no_grad():
        assert torch.allclose(api.load_task(backbone, imported).model(real), expected, atol=1e-4)


@pytest.mark.parametrize("kind,given,classes,budget", [
    ("classification", set(), 10, "3%"),  # the measured default (docs/benchmarks.md, "recipe search")
    ("classification", {"dropout", "dora", "max_rank"}, 10, "3%"),  # options a budget plan takes
    ("classification", {"rank"}, 10, None),  # --rank 8 given: the uniform plan it names
    ("classification", {"stage_ranks"}, 10, None),
    ("classification", {"task_norm"}, 10, None),
    ("classification", {"preset"}, 10, None),
    ("classification", {"targets"}, 10, None),
    ("classification", set(), 2000, None),  # the head alone would take over half of 3 %
    ("segmentation", set(), 3, None),
    ("detection", set(), 3, None),
    ("anomaly", set(), 2, None),
])
def test_default_plan_per_kind(budget_tasks, kind, given, classes, budget):
    plan = api.default_plan(TASK_KINDS[kind], budget_tasks["backbone"], classes, PlanConfig(dropout=0.1), given)
    assert plan.budget == budget and plan.dropout == 0.1 and plan.rank == 8


def test_the_default_plan_trains_as_the_3_percent_budget_it_names(budget_tasks):
    """api.adapt(plan=None) on a classification task is --budget 3%, run for run (choosing it
    leaves the seeded training's random state alone)."""
    from petah.runtime.attach import torch_section

    runs = []
    for plan in (None, PlanConfig(budget="3%")):
        torch.manual_seed(0)
        runs.append(api.adapt(budget_tasks["backbone"], budget_tasks["train"], budget_tasks["val"], plan=plan,
                              config=TrainConfig(max_steps=1, batch_size=16), task_name="t"))
    assert runs[0].package.manifest.plan.config["budget"] == "3%"
    tensors = [{**torch_section(r.package, "adapter"), **torch_section(r.package, "head")} for r in runs]
    assert tensors[0].keys() == tensors[1].keys() and all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])


def test_a_budget_below_the_head_names_the_minimum(budget_tasks):
    with pytest.raises(PetahError, match=r"the smallest budget for it is [\d,]+ bytes"):
        api.adapt(budget_tasks["backbone"], budget_tasks["train"], budget_tasks["val"],
                  plan=PlanConfig(budget="2KB"), config=TrainConfig(max_steps=1, batch_size=16))


def test_cli_budget_errors_write_nothing_and_plan_show_reads_a_package(budget_tasks, tmp_path):
    package = tmp_path / "x.petah"
    for args, needle in [(["--budget", "3 parsecs"], "is not a budget"),
                         (["--budget", "3%", "--stage-rank", "0=0"], "drop --stage-rank"),
                         (["--budget", "1KB"], "the smallest budget")]:
        proc = petah_process("adapt", "builtin:digits", "-b", "efficientformerv2_s0", "--img-size", SIZE,
                             "--max-steps", 1, "-o", package, *args, ok=False)
        assert proc.returncode != 0 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
        assert not package.exists()
    shown = one_json(petah_process("plan", "show", "--package", budget_tasks["made"]["gradient"][1], "--json"))
    manifest = budget_tasks["made"]["gradient"][0].package.manifest
    assert [layer["rank"] for layer in shown["layers"]] == [t.rank for t in manifest.plan.targets]
    assert set(shown["stages"]) == {"0", "1", "2", "3"}
    proc = petah_process("plan", "show", "efficientformerv2_s0", "--budget", "3%", ok=False)
    assert proc.returncode != 0 and "petah plan show --package" in proc.stderr
    # the classification default is the 3 % budget; naming a rank gives the uniform plan instead
    shapes = write_pattern_folder(tmp_path / "shapes", 6, seed=3)
    for args, budget in [([], "3%"), (["--rank", "8"], None)]:
        petah_process("adapt", shapes, "-b", "efficientformerv2_s0", "--img-size", SIZE, "--val-split", "0.25",
                      "--max-steps", 1, "--batch-size", 8, "-o", package, *args)
        info = one_json(petah_process("inspect", package, "--json"))
        assert info["plan"]["budget"] == budget and (info["ratio"] <= 0.03) == (budget is not None)
