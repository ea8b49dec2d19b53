"""The latency benchmark runs end to end (structure only: speed is a benchmark's job, not a test's)."""

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
