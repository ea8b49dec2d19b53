"""The benchmarks run end to end (structure only: speed is a benchmark's job, not a test's)."""

from pathlib import Path

from conftest import one_json, petah_process
from petah.bench.latency import run_latency


def test_bench_latency_reports_every_variant():
    result = run_latency(img_size=64, repeats=2, trunk_stages=2)
    assert set(result["latency_ms"]) == {
        "plain backbone (torch)", "task unmerged (torch)", "task merged (torch)",
        "plain backbone (onnx)", "task merged (onnx)", "task base + ort adapter (onnx)",
    }
    assert all(v > 0 for v in result["latency_ms"].values())
    assert set(result["shared_trunk"]) == {"stages", "1", "2", "3", "4"}
    memory = result["resident_bytes_by_tasks"]
    assert memory["0"] < memory["1"] < memory["4"] < memory["0"] * 1.5  # tasks add small diffs, not copies
    assert set(result["switch_ms"]) == {
        "unmerged swap", "merged swap (unmerge + merge)", "reload a full fine-tuned model"}


def test_methods_pareto_front_and_targets_from_a_table():
    from petah.bench.methods import pareto, targets

    assert pareto([(10, 0.5), (5, 0.6), (20, 0.55), (40, 0.9), (30, 0.9)]) == [(5, 0.6), (30, 0.9)]

    def row(acc, stored, step, rss):
        return {"test_mean": acc, "stored_bytes": stored, "step_seconds": step, "peak_rss_bytes": rss,
                "train_rss_rise_bytes": rss / 2}

    table = {"a": {"full": row(0.90, 1000, 1.0, 100), "attn-lora": row(0.80, 20, 0.5, 60),
                   "petah-r8": row(0.895, 25, 0.5, 60), "petah-r2": row(0.85, 10, 0.4, 55),
                   "peft-by-hand": row(0.88, 40, 0.7, 65)},
             "b": {"full": row(0.90, 1000, 1.0, 100), "attn-lora": row(0.86, 20, 0.5, 60),
                   "petah-r8": row(0.80, 25, 0.5, 60)}}
    found = targets(table)
    near = {r["task"]: r for r in found["petah_within_1pt_of_full_at_3pct_bytes"]}
    assert near["a"]["method"] == "petah-r8" and near["a"]["within_1_point"] and near["a"]["gap_points"] == 0.5
    assert near["b"]["within_1_point"] is False and near["b"]["gap_points"] == 10.0
    beats = {r["task"]: r for r in found["petah_vs_attn_lora_at_equal_or_fewer_bytes"]}
    assert beats["a"]["method"] == "petah-r2" and beats["a"]["margin_points"] == 5.0
    # no petah run as small as attn-lora there: the smallest one is reported with its size
    assert beats["b"]["method"] == "petah-r8" and beats["b"]["bytes_vs_attn_lora"] == 1.25
    assert beats["b"]["margin_points"] == -6.0
    speed = {r["task"]: r for r in found["training_speed"]}
    assert speed["a"]["step_vs_full"] == 0.5 and speed["a"]["step_vs_peft_by_hand"] == round(0.5 / 0.7, 3)
    assert speed["a"]["training_rss_rise_vs_full"] == 0.6 and speed["a"]["peft_by_hand_rss_rise_vs_full"] == 0.65
    assert "step_vs_peft_by_hand" not in speed["b"]


def test_bench_methods_quick(tmp_path):
    report = one_json(petah_process("bench", "methods", "--quick", "-o", tmp_path, "--json"))
    main, reference = report["backbones"]["efficientformerv2_s0@64px"], report["backbones"]["mobilenetv2_100@32px"]
    rows = main["table"]["digits"]
    assert set(rows) == {"linear-probe", "attn-lora", "peft-by-hand", "petah-r8", "full"}
    assert (rows["linear-probe"]["trainable_params"] < rows["petah-r8"]["trainable_params"]
            < rows["full"]["trainable_params"])
    assert rows["petah-r8"]["stored_bytes"] < 0.2 * rows["full"]["stored_bytes"]
    assert all(r["peak_rss_bytes"] > 50 * 2**20 and r["train_peak_rss_bytes"] <= r["peak_rss_bytes"]
               and r["train_rss_rise_bytes"] > 0 and r["images_per_second"] > 0 and r["latency_ms"] > 0
               for r in rows.values())
    assert len(main["runs"]) == 8 and all(r["max_steps"] == 3 for r in main["runs"])
    # the budget grid: every method at the uniform plan's bytes (within 5 %)
    point = main["budgets"]["digits"]["2.0"]
    assert set(point) == {"uniform", "budget-gradient", "adalora"}
    equal = point["uniform"]["equal_bytes"]
    assert all(abs(point[m]["stored_bytes"] - equal) <= 0.05 * equal for m in ("uniform", "budget-gradient"))
    assert point["budget-gradient"]["allocation_seconds"] > 0 and point["adalora"]["plan"]["adalora_target_r"] >= 1
    assert [m["task"] for m in main["targets"]["budget_vs_uniform"]] == ["digits"]
    # the reference backbone was trained by the bench first; MobileNetV2 has no attention, so no attn-lora
    assert main["source"] is None and reference["source"]["source"]["model"] == "mobilenetv2_100"
    assert Path(reference["source"]["path"]).parent == tmp_path / "sources"
    assert Path(reference["source"]["path"]).is_file()
    assert reference["skipped"] == ["attn-lora"]
    assert set(reference["table"]["digits"]) == {"linear-probe", "petah-r4", "full"}
    text = (tmp_path / "bench-methods.md").read_text()
    assert text.count("| digits |") == 9 and "| mobilenetv2_100@32px |" in text
    assert "Not run (no attention layers): attn-lora" in text
    assert all(Path(p).stat().st_size > 1000 for p in report["plots"])


def test_bench_methods_suites():
    import pytest

    from petah.bench.methods import DEFAULT_REFERENCES, FULL_SOURCE, METHODS, REFERENCE_METHODS, REFERENCES, suite
    from petah.errors import PetahError

    default = suite("default", "main.safetensors")
    assert default[0].backbone == "main.safetensors" and default[0].methods == tuple(METHODS) and default[0].seeds == 3
    # the dense budget grid: segmentation on the main backbone at 4 / 6 / 8 % with the demo's recipe
    dense = default[1]
    assert (dense.backbone, dense.tasks, dense.budgets, dense.budgets_only) == ("main.safetensors", ("defects",),
                                                                              (4.0, 6.0, 8.0), True)
    assert [g.source.model for g in default[2:]] == list(DEFAULT_REFERENCES)
    assert "efficientformer_l1" not in DEFAULT_REFERENCES
    assert all(g.backbone is None and g.methods == REFERENCE_METHODS and g.seeds == 1 and g.choose_rate
               for g in default[2:])
    assert [g.source.model for g in suite("default", "m", "all")[2:]] == list(REFERENCES)
    full = suite("full", "main.safetensors", "fastvit_sa12", seeds=2)
    assert len(full) == 3 and full[2].choose_rate and full[2].seeds == 2 and "peft-by-hand" not in full[2].methods
    assert full[2].source.images == FULL_SOURCE["images"] and full[2].source.img_size == 64
    assert full[2].shots == (10, 50, 100, None)
    assert [g.source.model for g in suite("full", "m")[2:]] == list(REFERENCES)  # --full includes efficientformer_l1
    assert len(suite("default", "m", "none")) == 2
    assert default[0].budgets == (1.0, 2.0, 3.0) and [g.budgets for g in default[2:]] == [(2.0,), (), (), ()]
    only = suite("default", "m", budgets_only=True)
    assert [g.source.model if g.source else g.backbone for g in only] == ["m", "m", "mobilevitv2_050"]
    assert all(g.budgets_only for g in only)
    with pytest.raises(PetahError, match="unknown reference backbone 'resnet50'"):
        suite("default", "m", "resnet50,fastvit_sa12")


def test_bench_source_is_trained_once_per_recipe(tmp_path):
    from dataclasses import replace

    from petah.backbones import create_backbone, save_backbone
    from petah.bench.methods import Source, source_backbone

    calls = []

    def fake_run(spec):  # stands in for the fork server's prepare run: writes a real backbone file
        calls.append(spec)
        save_backbone(create_backbone("mobilenetv3_small_050", 32), spec["out"],
                      {"metrics": {"accuracy": 0.5}, "training": {"seconds": 1.0}})
        return {"path": spec["out"], "source": spec["prepare"], "seconds": 1.0, "source_accuracy": 0.5}

    source = Source("mobilenetv3_small_050", 32, data="mnist5k", images=64)
    first = source_backbone(source, tmp_path, fake_run, log=lambda message: None)
    again = source_backbone(source, tmp_path, fake_run, log=lambda message: None)
    assert len(calls) == 1 and again["reused"] and again["path"] == first["path"] and again["source_accuracy"] == 0.5
    other = source_backbone(replace(source, lr=1e-3), tmp_path, fake_run, log=lambda message: None)
    assert len(calls) == 2 and other["path"] != first["path"]  # another recipe is another file


def test_bench_anomaly_holds_petah_against_patchcore_by_the_book():
    from petah.bench.anomaly import one_class_sets, run_anomaly_bench

    result = run_anomaly_bench(one_class=(), repeats=1)
    (row,) = result["sets"]
    assert row["set"] == "surface-anomalies" and row["anomalous"] > 0
    for method in ("petah", "patchcore"):
        assert 0.5 < row[method]["image_auroc"] <= 1 and 0.5 < row[method]["pixel_auroc"] <= 1, row
        assert row[method]["bytes"] > 0
    assert [r["batch"] for r in result["latency"]] == [1, 8] and all(r["ratio"] > 0 for r in result["latency"])
    assert set(result["targets"]) >= {"auroc_within_1_point", "bytes_at_most_5_percent", "latency_at_most_1_5x"}
    sets = one_class_sets("faces")  # each class in turn as good: trained on it alone, scored on all
    assert [name for name, _train, _val in sets] == ["faces:face", "faces:non-face"]
    _name, train, val = sets[0]
    assert not train.labels.any() and 0 < int(val.labels.sum()) < len(val)
