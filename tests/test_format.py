"""Package format v2: content hash over manifest + tensors, typed manifest validated on read, the
signature slot, v1 compatibility and upgrade, safe task names. No training: synthetic packages."""

import hashlib
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import save

from petah.backbones import create_backbone
from petah.errors import PetahError, PetahWarning
from petah.files import inside, staged_folder
from petah.packages import (
    FORMAT_VERSION,
    Manifest,
    content_sha256,
    read_package,
    set_signature,
    upgrade_package,
    write_package,
)
from petah.packages.manifest import canonical_json
from petah.plans import PlanConfig
from petah.runtime.attach import load_task
from petah.testing import synthetic_package

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("efficientformerv2_s0", 32)


@pytest.fixture
def package_path(backbone, tmp_path):
    package = synthetic_package(backbone, "parts", PlanConfig(rank=2, task_norm="affine"), classes=3,
                                labels=["ok", "scratch", "Delle-ä"])  # non-ASCII: UTF-8 in the canonical form
    return write_package(tmp_path / "parts.petah", package)


def raw_parts(path):
    with safe_open(str(path), framework="numpy") as handle:
        header = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    return header, json.loads(header["manifest"]), tensors


def rewrite(path, manifest, tensors, header=None, rehash=False):
    """Write a hand-edited package; ``rehash``: recompute the content hash as a forger would."""
    header = dict(header or raw_parts(path)[0])
    if rehash:
        manifest = {**manifest, "content_sha256": content_sha256(manifest, tensors)}
    header["manifest"] = canonical_json(manifest).decode()  # a careful forger keeps the canonical form
    path.write_bytes(save(tensors, metadata=header))


def test_round_trip_keeps_manifest_tensors_and_an_empty_signature(package_path):
    package = read_package(package_path)
    header, raw, tensors = raw_parts(package_path)
    assert set(header) == {"format", "manifest", "signature"} and header["signature"] == ""
    # a package without a head graph is written as version 2 (older readers keep reading it); 3 adds
    # one, 4 int8 adapters (tests/test_adapter_forms.py)
    assert raw["format_version"] == package.manifest.format_version == 2 and FORMAT_VERSION == 4
    assert package.manifest.to_dict() == raw  # the typed manifest is lossless
    assert package.manifest.plan.to_dict()["targets"] == raw["plan"]["targets"]
    assert all(isinstance(t, list) and len(t) == 3 for t in raw["plan"]["targets"])
    assert package.manifest.labels == ["ok", "scratch", "Delle-ä"]
    assert all(np.array_equal(tensors[k], package.tensors[k]) for k in tensors)


def test_the_documented_hash_can_be_recomputed_without_petah(package_path):
    """docs/format.md's recipe, written the way a third-party reader would (JSON + raw bytes)."""
    with safe_open(str(package_path), framework="numpy") as handle:
        header = handle.metadata()
        arrays = {k: handle.get_tensor(k) for k in handle.keys()}
    manifest = json.loads(header["manifest"])
    stored = manifest.pop("content_sha256")
    canonical = lambda v: json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()  # noqa: E731
    digest = hashlib.sha256(canonical(manifest) + b"\n")
    names = {np.dtype("float32"): "F32", np.dtype("float16"): "F16", np.dtype("int64"): "I64"}
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(canonical({"dtype": names[array.dtype], "name": name, "shape": list(array.shape)}) + b"\n")
        digest.update(array.astype(array.dtype.newbyteorder("<")).tobytes())
    assert digest.hexdigest() == stored


EDITS = {
    "label renamed": lambda m, t: m["task"]["labels"].__setitem__(0, "cat"),
    "one bit of a label": lambda m, t: m["task"]["labels"].__setitem__(1, chr(ord("s") ^ 1) + "cratch"),
    "accuracy edited": lambda m, t: m["metrics"].__setitem__("accuracy", 0.999),
    "plan rank edited": lambda m, t: m["plan"]["config"].__setitem__("rank", 4),
    "field added": lambda m, t: m.__setitem__("note", "harmless?"),
    "head tensor edited": lambda m, t: t.update({"head/bias": t["head/bias"] + 1.0}),
    "tensors swapped": lambda m, t: t.update({"head/bias": t["head/bias"][::-1].copy()}),
}


@pytest.mark.parametrize("edit", EDITS, ids=list(EDITS))
def test_any_edit_of_manifest_or_tensors_is_refused(package_path, edit):
    _, manifest, tensors = raw_parts(package_path)
    EDITS[edit](manifest, tensors)
    rewrite(package_path, manifest, tensors)
    with pytest.raises(PetahError, match=r"parts\.petah was modified or is corrupt") as info:
        read_package(package_path)
    assert "\n" not in str(info.value)


BAD_MANIFESTS = {
    "no backbone": (lambda m: m.pop("backbone"), r"manifest field backbone is missing"),
    "labels for another head": (lambda m: m["task"].update(labels=["a", "b", "c", "d"]),
                                r"4 label\(s\) for a head of 3"),
    "label not a string": (lambda m: m["task"]["labels"].__setitem__(0, 7), r"task\.labels must be a list of"),
    "task name with ..": (lambda m: m["task"].update(name="../x"), r"task name '\.\./x' is not allowed"),
    "absolute task name": (lambda m: m["task"].update(name="/abs/x"), r"task name '/abs/x' is not allowed"),
    "unknown kind": (lambda m: m["task"].update(kind="captioning"), r"task\.kind must be one of"),
    "bad target": (lambda m: m["plan"]["targets"].__setitem__(0, ["x", "lora"]), r"plan\.targets must be"),
    "negative rank": (lambda m: m["plan"]["targets"][0].__setitem__(2, -1), r"plan\.targets must be"),
    "unknown version": (lambda m: m.update(format_version=99), r"unknown package format version 99"),
    "bad fingerprint": (lambda m: m["backbone"].update(fingerprint="abc"), r"backbone\.fingerprint must be a sha256"),
    "bad adapter dtype": (lambda m: m.update(adapter_dtype="float8"), r"adapter_dtype must be one of"),
    "version as a float": (lambda m: m.update(format_version=2.0), r"unknown package format version 2\.0"),
    "std of strings": (lambda m: m["preprocessing"].update(std=["a", "b", "c"]), r"preprocessing\.std must be"),
    "std too large": (lambda m: m["preprocessing"].update(std=[10**400] * 3), r"preprocessing\.std must be"),
    "img_size as text": (lambda m: m["preprocessing"].update(img_size="32"), r"preprocessing\.img_size must be"),
    "stage ranks as a list": (lambda m: m["plan"]["config"].update(stage_ranks=[1, 2]), r"plan\.config\.stage_ranks"),
    "override modules not strings": (lambda m: m["plan"]["config"].update(override_modules=[5]),
                                     r"plan\.config\.override_modules"),
    "target regex that is not one": (lambda m: m["plan"]["config"].update(targets=["((("]), r"plan\.config\.targets"),
    "huge rank": (lambda m: m["plan"]["targets"][0].__setitem__(2, 10**30), r"plan\.targets must be"),
    "head list too long": (lambda m: m["head"].update(extra=list(range(100))), r"head\.extra must be"),
    "unknown intensity": (lambda m: m["preprocessing"].update(intensity="gamma"), r"preprocessing must be valid"),
}


@pytest.mark.parametrize("case", BAD_MANIFESTS, ids=list(BAD_MANIFESTS))
def test_a_malformed_manifest_gets_one_line_naming_the_file(package_path, case):
    """Even with a recomputed hash: the structure itself is validated on read."""
    edit, message = BAD_MANIFESTS[case]
    _, manifest, tensors = raw_parts(package_path)
    edit(manifest)
    rewrite(package_path, manifest, tensors, rehash=True)
    with pytest.raises(PetahError, match=message) as info:
        read_package(package_path)
    assert str(package_path) in str(info.value) and "\n" not in str(info.value)


def test_a_manifest_that_is_a_list_is_refused(package_path):
    header, _, tensors = raw_parts(package_path)
    header["manifest"] = "[1, 2]"
    package_path.write_bytes(save(tensors, metadata=header))
    with pytest.raises(PetahError, match="manifest must be a JSON object, got list"):
        read_package(package_path)


@pytest.mark.parametrize("change", ["drop", "add"])
def test_the_tensor_set_must_match_the_manifest(package_path, change):
    _, manifest, tensors = raw_parts(package_path)
    if change == "drop":
        tensors.pop(next(k for k in tensors if k.startswith("adapter/")))
    else:
        tensors["head/extra"] = np.zeros(2, np.float32)
    rewrite(package_path, manifest, tensors, rehash=True)
    with pytest.raises(PetahError, match="is missing 1 tensor" if change == "drop" else "does not name"):
        read_package(package_path)


def test_signing_fills_the_slot_without_touching_what_is_hashed(package_path):
    before = read_package(package_path)
    set_signature(package_path, '[{"keyid": "k", "sig": "c2ln"}]')
    after = read_package(package_path)
    assert after.signature == '[{"keyid": "k", "sig": "c2ln"}]'
    assert after.manifest.content_sha256 == before.manifest.content_sha256
    assert after.manifest.to_dict() == before.manifest.to_dict()
    # the slot is outside the hash: a copied signature is the fleet's check to refuse, not the hash's
    header, manifest, tensors = raw_parts(package_path)
    rewrite(package_path, manifest, tensors, {**header, "signature": "forged"})
    assert read_package(package_path).signature == "forged"


def test_v1_packages_load_with_a_warning_and_upgrade_to_v2(tmp_path):
    from petah.demo import demo_backbone_path

    backbone = create_backbone(weights=str(demo_backbone_path()))
    fixture = FIXTURES / "v1-attn-lora.petah"
    with pytest.warns(PetahWarning, match=r"format-1 package: its manifest is not covered by a hash"):
        v1 = load_task(backbone, fixture)
    assert v1.manifest.format_version == 1 and v1.classes == ["zero", "one", "two", "three"]
    upgraded, was = upgrade_package(fixture, tmp_path / "v2.petah")
    assert was == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", PetahWarning)  # a v2 file loads silently
        v2 = load_task(backbone, upgraded)
    assert v2.manifest.format_version == 2 and v2.manifest.content_sha256
    x = torch.randn(2, 3, backbone.img_size, backbone.img_size)
    with torch.no_grad():
        assert torch.equal(v1.model(x), v2.model(x))
    with pytest.warns(PetahWarning):  # the fixture itself is untouched (upgrade wrote elsewhere)
        assert read_package(fixture).manifest.format_version == 1


def test_an_edited_v1_manifest_is_not_detected_which_is_why_v2_exists(tmp_path):
    """v1's hash covers the tensors only; the warning says so. (v2 refuses the same edit, above.)"""
    path = tmp_path / "v1.petah"
    path.write_bytes((FIXTURES / "v1-attn-lora.petah").read_bytes())
    header, manifest, tensors = raw_parts(path)
    manifest["task"]["labels"][0] = "cat"
    rewrite(path, manifest, tensors, header)
    with pytest.warns(PetahWarning):
        assert read_package(path).manifest.labels[0] == "cat"


def test_names_from_packages_never_leave_the_output_folder(tmp_path):
    assert inside(tmp_path, "task.onnx") == (tmp_path / "task.onnx").resolve()
    for bad in ("../x", "/abs/x", "a/../../x", ".", ""):
        with pytest.raises(PetahError, match="would leave the output folder"):
            inside(tmp_path, bad)


def test_a_staged_folder_is_all_or_nothing(tmp_path):
    out = tmp_path / "export"
    with pytest.raises(RuntimeError):
        with staged_folder(out) as stage:
            (stage / "base.onnx").write_bytes(b"x")
            raise RuntimeError("second task failed")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with staged_folder(out) as stage:
        (stage / "base.onnx").write_bytes(b"y")
    assert (out / "base.onnx").read_bytes() == b"y" and [p.name for p in tmp_path.iterdir()] == ["export"]


def test_manifest_from_dict_round_trips(package_path):
    raw = raw_parts(package_path)[1]
    assert Manifest.from_dict(raw, "x").to_dict() == raw


def test_the_device_side_does_not_import_the_training_stack():  # runtime and station
    code = ("import sys, petah.runtime, petah.runtime.onnx, petah.packages, petah.serve.app, petah.serve.engine; "
            "print(sorted(m for m in sys.modules if m.startswith(('petah.api', 'petah.train', 'petah.cli', "
            "'petah.bench', 'petah.prune', 'petah.export'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout


def test_cli_upgrade_rewrites_a_v1_package_and_warns_once_before(tmp_path):
    from conftest import one_json, petah_process

    v1 = tmp_path / "old.petah"
    v1.write_bytes((FIXTURES / "v1-attn-lora.petah").read_bytes())
    inspected = petah_process("inspect", v1, "--json")
    warning_lines = [line for line in inspected.stderr.splitlines() if line.strip()]
    assert len(warning_lines) == 1 and "format-1 package" in warning_lines[0] and "petah upgrade" in warning_lines[0]
    assert one_json(inspected)["format_version"] == 1
    upgraded = one_json(petah_process("upgrade", v1, "--json"))
    assert upgraded == {"package": str(v1), "from_version": 1, "format_version": 2,
                        "package_bytes": v1.stat().st_size, "signature_removed": False}
    again = petah_process("inspect", v1, "--json")
    assert again.stderr.strip() == "" and one_json(again)["format_version"] == 2


def test_cli_export_refuses_a_package_whose_task_name_would_escape(backbone, tmp_path):
    """A forged package named ../x (hash recomputed) must not write a PEFT folder outside DIR."""
    from conftest import petah_process

    backbone_file = tmp_path / "bb.safetensors"
    from petah.backbones import save_backbone

    save_backbone(backbone, backbone_file, {})
    paths = []
    for name in ("good", "evil"):
        path = write_package(tmp_path / f"{name}.petah", synthetic_package(backbone, name, PlanConfig(), classes=3))
        paths.append(path)
    _, manifest, tensors = raw_parts(paths[1])
    manifest["task"]["name"] = "../escaped"
    rewrite(paths[1], manifest, tensors, rehash=True)
    for extra in (["--peft", tmp_path / "peft"], ["--ort-adapters", "-o", tmp_path / "ort"]):
        proc = petah_process("export", *paths, "-b", backbone_file, *extra, ok=False)
        assert proc.returncode == 2 and "task name '../escaped' is not allowed" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bb.safetensors", "evil.petah", "good.petah"]


def test_a_nan_output_fails_the_parity_check():
    import numpy as np

    from petah.export.onnx import worst_error

    assert worst_error(0.0, np.array([1.0, np.nan]), np.array([1.0, 1.0])) == float("inf")
    assert worst_error(0.5, np.array([1.0]), np.array([1.25])) == 0.5


def test_a_failed_ort_adapters_export_leaves_nothing_behind(backbone, tmp_path):
    from petah.export import export_base_and_adapters

    good = synthetic_package(backbone, "good", PlanConfig(rank=2), classes=3)
    torch.manual_seed(1)
    other_backbone = create_backbone("efficientformerv2_s0", 32)  # other random weights: another fingerprint
    stranger = synthetic_package(other_backbone, "stranger", PlanConfig(rank=2), classes=3)
    out = tmp_path / "ort"
    with pytest.raises(PetahError, match="was trained on"):
        export_base_and_adapters(backbone, [good, stranger], out)  # fails on the second task, after base.onnx
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spelling", ["spaces", "duplicate key", "nan", "deep"])
def test_only_the_canonical_spelling_of_a_manifest_is_read(package_path, spelling):
    """One manifest, one reading: a reader that keeps the first of two duplicate keys sees what was hashed."""
    header, manifest, tensors = raw_parts(package_path)
    text = canonical_json(manifest).decode()
    header["manifest"] = {
        "spaces": json.dumps(manifest, sort_keys=True),
        "duplicate key": text[:-1] + ',"adapter_dtype":"float16"}',
        "nan": text[:-1] + ',"zz":NaN}',
        "deep": text[:-1] + ',"zz":' + "[" * 100_000 + "]" * 100_000 + "}",
    }[spelling]
    package_path.write_bytes(save(tensors, metadata=header))
    with pytest.raises(PetahError, match="not in canonical form|not valid JSON") as info:
        read_package(package_path)
    assert str(package_path) in str(info.value) and "\n" not in str(info.value)


def test_signing_with_a_newer_petah_keeps_the_hashed_bytes(package_path, monkeypatch):
    """The signer's version is not the writer's: signing must not re-stamp (and so re-hash) the manifest."""
    import petah.packages.format as codec

    before, _, _ = raw_parts(package_path)
    monkeypatch.setattr(codec, "__version__", "9.9.9")
    set_signature(package_path, "signed-by-a-newer-petah")
    after, _, _ = raw_parts(package_path)
    assert after["manifest"] == before["manifest"] and after["signature"] == "signed-by-a-newer-petah"
    copy = upgrade_package(package_path, package_path.with_name("copy.petah"))[0]
    assert copy.read_bytes() == package_path.read_bytes()  # a current file is copied unchanged, signature and all


HEADS = {
    "an out-of-range width": (lambda m: m["head"].update(in_features=2 * 10**9), r"head\.in_features must be"),
    # 100,000 x 100,000 floats would be 40 GB: the description is built on the meta device and refused
    "a head asking for 40 GB": (lambda m: (m["head"].update(in_features=100_000, out_features=100_000),
                                          m["task"].update(labels=[f"c{i}" for i in range(100_000)])),
                                r"head tensors do not fit the head it describes \(head/bias: \(3,\) stored"),
    "another width than its tensors": (lambda m: m["head"].update(in_features=64), r"head tensors do not fit"),
}


@pytest.mark.parametrize("case", HEADS, ids=list(HEADS))
def test_a_head_description_is_checked_against_its_tensors_before_allocation(backbone, package_path, case):
    edit, message = HEADS[case]
    _, manifest, tensors = raw_parts(package_path)
    edit(manifest)
    rewrite(package_path, manifest, tensors, rehash=True)
    with pytest.raises(PetahError, match=message):
        load_task(backbone, package_path)


@pytest.mark.parametrize("head, message", [
    ({"in_channels": [], "strides": []}, "head description is invalid|do not fit"),
    ({"convs": 100_000}, r"convs must be 0\.\.16"),
])
def test_a_dense_head_description_is_refused_before_it_is_built(head, message):
    from petah.runtime.attach import check_head
    from petah.tasks import Detection

    description = {"in_channels": [8, 8, 8], "grids": [4, 2, 1], "width": 8, "convs": 1, "out_features": 2,
                   "strides": [8, 16, 32], **head}
    with pytest.raises(PetahError, match=message):
        check_head(Detection, description, {}, "package x.petah")


def test_nothing_unreadable_is_written(backbone, tmp_path):
    package = synthetic_package(backbone, "parts", PlanConfig(), classes=2, labels=["ok", "bad"])
    package.manifest.task = type(package.manifest.task)("parts", "classification", ("ok", 7))
    with pytest.raises(PetahError, match="task.labels must be"):
        write_package(tmp_path / "x.petah", package)
    assert list(tmp_path.iterdir()) == []
