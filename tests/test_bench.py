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
    assert set(result["switch_ms"]) == {"unmerged swap", "merged swap (unmerge + merge)", "reload a full fine-tuned model"}


def test_methods_pareto_front_and_targets_from_a_table():
    from petah.bench.methods import pareto, targets

    assert pareto([(10, 0.5), (5, 0.6), (20, 0.55), (40, 0.9), (30, 0.9)]) == [(5, 0.6), (30, 0.9)]

    def row(acc, stored, step, rss):
        return {"test_mean": acc, "stored_bytes": stored, "step_seconds": step, "peak_rss_bytes": rss}

    table = {"a": {"full": row(0.90, 1000, 1.0, 100), "attn-lora": row(0.80, 20, 0.5, 60), "petah-r8": row(0.895, 25, 0.5, 60),
                   "petah-r2": row(0.85, 10, 0.4, 55), "peft-by-hand": row(0.88, 40, 0.7, 65)},
             "b": {"full": row(0.90, 1000, 1.0, 100), "attn-lora": row(0.86, 20, 0.5, 60), "petah-r8": row(0.80, 25, 0.5, 60)}}
    found = targets(table)
    near = {r["task"]: r for r in found["petah_within_1pt_of_full_at_3pct_bytes"]}
    assert near["a"]["method"] == "petah-r8" and near["a"]["within_1_point"] and near["a"]["gap_points"] == 0.5
    assert near["b"]["within_1_point"] is False and near["b"]["gap_points"] == 10.0
    beats = {r["task"]: r for r in found["petah_vs_attn_lora_at_equal_or_fewer_bytes"]}
    assert beats["a"]["method"] == "petah-r2" and beats["a"]["margin_points"] == 5.0
    assert "b" not in beats  # no petah run as small as attn-lora there
    speed = {r["task"]: r for r in found["training_speed"]}
    assert speed["a"]["step_vs_full"] == 0.5 and speed["a"]["step_vs_peft_by_hand"] == round(0.5 / 0.7, 3)
    assert "step_vs_peft_by_hand" not in speed["b"]


def test_bench_methods_quick(tmp_path):
    report = one_json(petah_process("bench", "methods", "--quick", "-o", tmp_path, "--json"))
    rows = report["table"]["digits"]
    assert set(rows) == {"linear-probe", "attn-lora", "peft-by-hand", "petah-r8", "full"}
    assert rows["linear-probe"]["trainable_params"] < rows["petah-r8"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["petah-r8"]["stored_bytes"] < 0.2 * rows["full"]["stored_bytes"]
    assert all(r["peak_rss_bytes"] > 50 * 2**20 and r["images_per_second"] > 0 and r["latency_ms"] > 0 for r in rows.values())
    assert len(report["runs"]) == 5 and all(r["max_steps"] == 3 for r in report["runs"])
    assert (tmp_path / "bench-methods.md").read_text().count("| digits |") == 5
    assert all(Path(p).stat().st_size > 1000 for p in report["plots"])
