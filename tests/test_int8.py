"""int8 export: the demo tasks quantized on their own images keep their scores, record what
stayed float, and bad requests are one-line errors that write nothing."""

from __future__ import annotations

import json

import onnx
import pytest

from conftest import one_json
from conftest import petah_process as petah
from petah.backbones import create_backbone, demo_backbone_path
from petah.data import load_dataset
from petah.export import export_merged
from petah.export.int8 import int8_graph, quantize, score
from petah.export.onnx import calibration_sets
from petah.packages import read_package
from petah.runtime.onnx import merged_task_graph
from petah.serve import demo_packages
from petah.tasks import task_kind

PACKAGES = {p.stem: p for p in demo_packages()}
BACKBONE = demo_backbone_path()


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("task, data, tolerance", [("digits", "builtin:digits", 1.0),
                                                   ("digit-boxes", "builtin:digit-boxes", 2.0)])
def test_int8_keeps_the_task_score_and_records_what_stayed_float(tmp_path, task, data, tolerance):

    backbone = create_backbone(weights=str(BACKBONE))
    package = read_package(PACKAGES[task])
    graph, module, manifest = merged_task_graph(backbone, package, task)
    calibration, validation = calibration_sets(manifest, load_dataset(data), 32)
    kind = task_kind(manifest.task.kind)
    int8 = quantize(graph, calibration)
    labels = list(manifest.labels)
    assert score(graph, module.head, kind, validation, labels) - score(int8, module.head, kind, validation,
                                                                        labels) <= tolerance
    assert len(int8) < 0.4 * len(graph)  # int8 weights
    quantized = {n.op_type for n in onnx.load_from_string(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Softmax"} <= quantized

    result = export_merged(backbone, package, tmp_path / f"{task}.onnx", int8="always", data=load_dataset(data),
                           calibration_images=32)
    recorded = json.loads(metadata(result.path)["petah.int8"])
    assert recorded["quantized"] and recorded["mode"] == "always" and recorded["calibration_images"] == 32
    assert "Softmax" in recorded["float_op_types"] and "Conv (grouped)" in recorded["float_op_types"]


def test_int8_auto_keeps_float_where_int8_is_not_worth_it(tmp_path):
    """With a tolerance no int8 graph can meet, auto sends layers back to float step by step and
    writes the float graph; its reason says why."""

    backbone = create_backbone(weights=str(BACKBONE))
    graph, module, manifest = merged_task_graph(backbone, read_package(PACKAGES["textures"]), "textures")
    calibration, validation = calibration_sets(manifest, load_dataset("builtin:textures"), 16)
    chosen, report = int8_graph(graph, module.head, task_kind("classification"), calibration, mode="auto",
                                validation=validation, classes=list(manifest.labels), tolerance=-1.0)
    assert chosen == graph and not report.quantized and "every layer float" in report.reason
    assert report.steps[0]["float_nodes"] == 0 and report.steps[-1]["float_nodes"] == report.quantized_nodes


@pytest.mark.parametrize("args, fragments", [
    (["--int8"], ["int8 export needs", "--data"]),
    (["--int8", "auto", "--data", "builtin:defects"], ["classification task", "segmentation"]),
    (["--int8", "--data", "builtin:textures"], ["classes"]),
    (["--int8", "auto", "--ort-adapters", "--data", "builtin:digits"], ["--ort-adapters", "--int8 (always)"]),
    (["--int8", "--peft", "peft-out", "--data", "builtin:digits"], ["--peft"]),
])
def test_int8_bad_requests_are_one_line_errors_and_write_nothing(tmp_path, args, fragments):
    out = tmp_path / "out"
    proc = petah("export", PACKAGES["digits"], "-b", BACKBONE, "-o", out, *args, ok=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists() or not any(out.iterdir())


def test_export_int8_cli_json(tmp_path):
    result = one_json(petah("export", PACKAGES["textures"], "-b", BACKBONE, "-o", tmp_path, "--int8", "--data",
                            "builtin:textures", "--calibration-images", "16", "--json"))
    row = result["exports"][0]
    assert row["int8"]["quantized"] and row["onnx_bytes"] < 5_000_000


def test_int8_base_graph_keeps_float_adapters_switching_tasks(tmp_path):
    """--ort-adapters --int8: the shared base graph int8, every node that reads an adapter tensor
    float; a task's float adapter file gives the float base's answers."""
    import numpy as np
    import onnxruntime as ort

    from petah.export import export_base_and_adapters
    from petah.export.onnx import calibration_batches
    from petah.packages import read_manifest

    backbone = create_backbone(weights=str(BACKBONE))
    packages = [PACKAGES["digits"], PACKAGES["textures"]]
    train, val = load_dataset("builtin:digits")
    calibration = calibration_batches(read_manifest(packages[0]), train, 32, check_classes=False)
    floats = export_base_and_adapters(backbone, packages, tmp_path / "float")
    ints = export_base_and_adapters(backbone, packages, tmp_path / "int8", int8_calibration=calibration)
    assert ints.base_bytes < 0.5 * floats.base_bytes
    recorded = json.loads(metadata(ints.base_path)["petah.int8"])
    assert recorded["adapter_nodes_float"] > 0 and recorded["quantized_nodes"] > 0
    x = np.concatenate(calibration_batches(read_manifest(packages[0]), val, 128, check_classes=False))
    answers = {}
    for name, export in (("float", floats), ("int8", ints)):
        session = ort.InferenceSession(str(export.base_path), providers=["CPUExecutionProvider"])
        adapter = ort.LoraAdapter()
        adapter.Load(str(export.base_path.parent / "digits.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        answers[name] = session.run(None, {"image": x}, options)[0][:, :10].argmax(1)
    assert (answers["float"] == answers["int8"]).mean() >= 0.97
