"""The CLI as a user runs it: real processes, --json output, one-line errors and exit codes."""

import json

import pytest
import torch
from PIL import Image

from conftest import make_pattern, one_json, write_pattern_folder
from conftest import petah_process as petah
from petah.errors import PetahError


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = write_pattern_folder(root / "shapes", 8, seed=50)
    backbone = root / "bb.safetensors"
    prepared = one_json(petah("prepare", "efficientformerv2_s0", folder, "-o", backbone, "--img-size", "32",
                              "--val-split", "0.25", "--max-steps", "2", "--batch-size", "8", "--json"))
    package = root / "shapes.petah"
    adapted = one_json(petah("adapt", folder, "-b", backbone, "-o", package, "--val-split", "0.25", "--max-steps", "2",
                             "--batch-size", "8", "--confusion-png", root / "cm.png", "--json"))
    return {"root": root, "folder": folder, "backbone": backbone, "package": package,
            "prepared": prepared, "adapted": adapted}


def test_prepare_and_adapt_json(workspace):
    prepared, adapted = workspace["prepared"], workspace["adapted"]
    assert prepared["backbone"] == "efficientformerv2_s0" and prepared["img_size"] == 32
    assert len(prepared["fingerprint"]) == 64
    # the documented contract of `adapt --json` (docs/format.md), and the numbers are the package's own
    assert set(adapted) >= {"package", "task", "kind", "plan", "accuracy", "metrics", "package_bytes", "backbone_bytes",
                            "train_seconds"}
    assert adapted["package_bytes"] == workspace["package"].stat().st_size and adapted["kind"] == "classification"
    recorded = one_json(petah("inspect", workspace["package"], "--json"))
    assert adapted["accuracy"] == recorded["metrics"]["accuracy"] == adapted["metrics"]["accuracy"]
    assert adapted["backbone_bytes"] == recorded["backbone_bytes"] and adapted["task"] == "shapes"
    assert (workspace["root"] / "cm.png").read_bytes()[:4] == b"\x89PNG"


def test_inspect_json(workspace):
    info = one_json(petah("inspect", workspace["package"], "--json"))
    for key in ("package_bytes", "backbone_bytes", "ratio", "backbone", "fingerprint", "plan", "task", "metrics"):
        assert key in info
    assert info["ratio"] == pytest.approx(info["package_bytes"] / info["backbone_bytes"], rel=1e-4)
    assert info["fingerprint"] == workspace["prepared"]["fingerprint"] and info["plan"]["preset"] == "petah"


def test_eval_and_predict_json(workspace):
    report = one_json(petah("eval", workspace["package"], workspace["folder"], "-b", workspace["backbone"],
                            "--val-split", "0.25", "--json"))
    assert report["metrics"]["accuracy"] == workspace["adapted"]["accuracy"]
    image = next((workspace["folder"] / "square").iterdir())
    result = one_json(petah("predict", image, image, "-b", workspace["backbone"], "-p", workspace["package"], "--json"))
    predictions = result["tasks"]["shapes"]
    assert len(predictions) == 2 and predictions[0]["label"] in ("hstripes", "vstripes", "square")


def _assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_package_for_another_backbone_is_refused(workspace):
    proc = petah("eval", workspace["package"], workspace["folder"], "-b", "efficientformerv2_s0", "--img-size", "64",
                 "--val-split", "0.25", ok=False)
    _assert_one_line_error(proc, "efficientformerv2_s0@32px", "efficientformerv2_s0@64px")


def test_corrupt_package_is_refused(workspace, tmp_path):
    bad = tmp_path / "bad.petah"
    data = bytearray(workspace["package"].read_bytes())
    data[-3] ^= 0x55
    bad.write_bytes(bytes(data))
    _assert_one_line_error(petah("inspect", bad, ok=False), "corrupt")


def test_unreadable_image_is_reported(workspace, tmp_path):
    bad = tmp_path / "oops.jpg"
    bad.write_text("nope")
    failed = petah("predict", bad, "-b", workspace["backbone"], "-p", workspace["package"], ok=False)
    _assert_one_line_error(failed, "oops.jpg")


def test_attn_lora_on_a_cnn_is_an_error(workspace, tmp_path):
    proc = petah("adapt", workspace["folder"], "-b", "resnet10t", "--img-size", "32", "--plan", "attn-lora",
                 "-o", tmp_path / "x.petah", "--val-split", "0.25", ok=False)
    _assert_one_line_error(proc, "attn-lora needs attention layers")
    assert not (tmp_path / "x.petah").exists()


def test_debug_shows_traceback(workspace, tmp_path):
    proc = petah("--debug", "inspect", tmp_path / "absent.petah", ok=False)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_efficientformer_l1_rank8_ratio_is_below_3_percent(tmp_path):
    folder = tmp_path / "ten"
    for c in range(10):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(make_pattern(c % 3, size=16, seed=c * 10 + i)).save(folder / f"c{c}" / f"{i}.png")
    package = tmp_path / "l1.petah"
    petah("adapt", folder, "-b", "efficientformer_l1", "--rank", "8", "-o", package, "--val-split", "0.5",
          "--max-steps", "1", "--batch-size", "4")
    info = one_json(petah("inspect", package, "--json"))
    assert info["ratio"] <= 0.03 and info["task"]["labels"] == [f"c{c}" for c in range(10)]


def test_demo_json_quick(tmp_path):
    result = one_json(petah("demo", "-o", tmp_path / "demo", "--max-steps", "2", "--json"))
    rows = result["tasks"]
    assert {(r["task"], r["plan"]) for r in rows} >= {("digits", "petah"), ("digits", "linear-probe")}
    for row in rows:
        assert set(row) >= {"task", "plan", "accuracy", "package_bytes", "backbone_bytes", "train_seconds"}
        assert (tmp_path / "demo" / f"{row['task']}-{row['plan']}.petah").stat().st_size == row["package_bytes"]


def test_predict_jsonl_over_a_folder_keeps_going_past_bad_files(workspace, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(workspace["folder"] / "square", folder)
    (folder / "zz_broken.png").write_bytes(b"\x89PNG not really")
    proc = petah("predict", folder, "-b", workspace["backbone"], "-p", workspace["package"], "--jsonl", ok=False)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 9 and proc.returncode == 1
    assert "zz_broken.png" in lines[-1]["image"] and "cannot read image" in lines[-1]["error"]
    assert all(line["tasks"]["shapes"]["label"] for line in lines[:-1])


def test_export_peft_and_import_peft(workspace, tmp_path):
    exported = one_json(petah("export", workspace["package"], "-b", workspace["backbone"],
                              "--peft", tmp_path / "peft", "--json"))
    assert exported["exports"][0]["max_abs_error"] < 1e-4
    imported = one_json(petah("import-peft", tmp_path / "peft", "-b", workspace["backbone"],
                              "-o", tmp_path / "back.petah", "--json"))
    assert imported["backbone_checked"] and imported["max_abs_error"] < 1e-2  # adapters stored in float16
    original = one_json(petah("inspect", workspace["package"], "--json"))
    shown = one_json(petah("inspect", tmp_path / "back.petah", "--json"))
    assert shown["task"] == original["task"] and shown["fingerprint"] == original["fingerprint"]
    bad = petah("import-peft", tmp_path, "-b", workspace["backbone"], "-o", tmp_path / "x.petah", ok=False)
    assert bad.returncode == 2 and "adapter_config.json is missing" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.petah").exists()


def test_plan_show_lists_layers_and_refuses_what_a_family_lacks():
    shown = one_json(petah("plan", "show", "mobilevitv2_050", "--img-size", "64", "--rank", "4", "--json"))
    assert shown["family"] == "mobilevit" and shown["layers"] and shown["trainable_percent"] > 0
    assert {layer["method"] for layer in shown["layers"]} == {"lora", "channel_scale"}
    assert all(layer["rank"] == 4 for layer in shown["layers"] if layer["method"] == "lora")
    bad = petah("plan", "show", "fastvit_t8", "--plan", "attn-lora", ok=False)
    assert bad.returncode == 2 and "has none" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("top_k", ["-1", "0"])
def test_predict_refuses_a_top_k_below_one(workspace, top_k):
    image = next((workspace["folder"] / "square").iterdir())
    proc = petah("predict", image, "-b", workspace["backbone"], "-p", workspace["package"], "--top-k", top_k, ok=False)
    assert proc.returncode == 2
    _assert_one_line_error(proc, "top_k (--top-k) must be a whole number >= 1")


def test_predict_on_a_folder_without_images_is_an_error(workspace, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    for extra in ([], ["--jsonl"]):
        proc = petah("predict", empty, "-b", workspace["backbone"], "-p", workspace["package"],
                     "--out-dir", tmp_path / "out", *extra, ok=False)
        assert proc.returncode == 2 and proc.stdout == ""
        _assert_one_line_error(proc, f"no images found in {empty}")
    assert not (tmp_path / "out").exists()


def test_api_predict_refuses_a_top_k_below_one(workspace):
    from petah import api

    backbone = api.resolve_backbone(workspace["backbone"])
    with pytest.raises(PetahError, match="top_k"):
        api.predict(backbone, [workspace["package"]], [torch.zeros(3, 32, 32, dtype=torch.uint8)], top_k=0)
    with pytest.raises(PetahError, match="no images found"):
        api.predict_files(backbone, [workspace["package"]], [])
