"""Package signatures: keygen / sign / verify, and what --trust / --require-signed accept."""

import dataclasses
import json
import os
import stat

import pytest
import torch

from conftest import one_json, petah_process
from petah.backbones import create_backbone
from petah.errors import PetahWarning
from petah.packages import (
    SignatureError,
    TaskPackage,
    TrustPolicy,
    TrustStore,
    generate_keypair,
    read_package,
    sign_package,
    write_package,
)
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.testing import synthetic_package


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("signing")
    torch.manual_seed(0)
    backbone = create_backbone("efficientformerv2_s0", 32)
    trusted, other = root / "trusted", root / "other"
    trusted.mkdir()
    other.mkdir()
    generate_keypair(trusted / "release")
    generate_keypair(other / "stranger")
    packages = {}
    for name, seed in (("parts", 1), ("other", 2)):
        path = root / f"{name}.petah"
        write_package(path, synthetic_package(backbone, name, PlanConfig(rank=2), classes=3, seed=seed))
        packages[name] = path
    return {"root": root, "backbone": backbone, "trusted": trusted, "other": other, "packages": packages}


def fresh(setup, name="parts"):
    """A copy of an unsigned package (tests sign and edit their own)."""
    path = setup["root"] / f"copy-{name}-{os.urandom(4).hex()}.petah"
    path.write_bytes(setup["packages"][name].read_bytes())
    return path


def policy(setup, require=True):
    return TrustPolicy(TrustStore.from_dir(setup["trusted"]), require_signed=require)


def test_keygen_writes_a_private_key_only_its_owner_reads_and_never_overwrites(tmp_path):
    private, public, kid = generate_keypair(tmp_path / "k")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.read_text().startswith("-----BEGIN PUBLIC KEY")
    assert len(kid) == 64
    with pytest.raises(Exception, match="never overwrites"):
        generate_keypair(tmp_path / "k")


def test_signing_keeps_the_content_hash_and_verifies(setup):
    path = fresh(setup)
    before = read_package(path).manifest.content_sha256
    kid = sign_package(path, setup["trusted"] / "release.key")
    package = read_package(path)
    assert package.manifest.content_sha256 == before
    assert policy(setup).check(package, "p") == [kid]
    sign_package(path, setup["other"] / "stranger.key")  # a second signer is added, the first kept
    assert len(json.loads(read_package(path).signature)) == 2
    assert policy(setup).check(read_package(path), "p") == [kid]


def test_unsigned_untrusted_edited_and_copied_signatures_are_refused(setup):
    strict, lenient = policy(setup), policy(setup, require=False)
    unsigned = read_package(fresh(setup))
    with pytest.raises(SignatureError, match="is not signed; --require-signed"):
        strict.check(unsigned, "p")
    with pytest.warns(PetahWarning, match="not signed"):
        assert lenient.check(unsigned, "p") == []

    by_stranger = fresh(setup)
    sign_package(by_stranger, setup["other"] / "stranger.key")
    for rule in (strict, lenient):  # a signed package must verify, required or not
        with pytest.raises(SignatureError, match="only by key"):
            rule.check(read_package(by_stranger), "p")

    signed = fresh(setup)
    sign_package(signed, setup["trusted"] / "release.key")
    package = read_package(signed)
    for edit in ("tensor", "manifest"):  # edited after signing, the hash recomputed as an attacker would
        tensors = dict(package.tensors)
        manifest = read_package(signed).manifest
        if edit == "tensor":
            key = next(k for k in tensors if k.startswith("head/"))
            tensors[key] = tensors[key] + 1.0
        else:
            manifest.task = dataclasses.replace(manifest.task, labels=("a", "b", "c-edited"))
        edited = setup["root"] / f"edited-{edit}.petah"
        write_package(edited, TaskPackage(manifest, tensors, package.signature))
        assert read_package(edited).signature == package.signature  # the hash checks out, the signature not
        with pytest.raises(SignatureError, match="does not verify"):
            lenient.check(read_package(edited), "p")

    other = fresh(setup, "other")
    sign_package(other, setup["trusted"] / "release.key")
    copied = read_package(fresh(setup))
    copied.signature = read_package(other).signature  # a valid signature, of another package
    with pytest.raises(SignatureError, match="does not verify"):
        strict.check(copied, "p")


def test_runtime_refuses_before_loading_anything(setup):
    runtime = Runtime(setup["backbone"], trust=policy(setup))
    with pytest.raises(SignatureError):
        runtime.load(fresh(setup))
    assert runtime.tasks == {} and not runtime._layers
    signed = fresh(setup)
    sign_package(signed, setup["trusted"] / "release.key")
    assert runtime.load(signed).name == "parts"
    with pytest.raises(Exception, match="needs --trust"):
        TrustPolicy(None, require_signed=True)


def test_cli_keygen_sign_verify_and_predict_require_signed(setup, tmp_path):
    keys = tmp_path / "keys"
    keys.mkdir()
    made = one_json(petah_process("keygen", "-o", keys / "team", "--json"))
    path = fresh(setup)
    refused = petah_process("verify", path, "--trust", keys, ok=False)
    assert refused.returncode == 2 and "is not signed" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert one_json(petah_process("sign", path, "--key", keys / "team.key", "--json"))["keyid"] == made["keyid"]
    assert one_json(petah_process("verify", path, "--trust", keys, "--json"))["trusted_signers"] == [made["keyid"]]
    wrong = petah_process("verify", path, "--trust", setup["trusted"], ok=False)
    assert wrong.returncode == 2 and "not in" in wrong.stderr
    bb = tmp_path / "bb.safetensors"
    from petah.backbones import save_backbone

    save_backbone(setup["backbone"], bb)
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32), (120, 30, 200)).save(image)
    unsigned = fresh(setup)
    proc = petah_process("predict", image, "-b", bb, "-p", unsigned, "--trust", keys, "--require-signed",
                         "--out-dir", tmp_path / "out", ok=False)
    assert proc.returncode == 2 and "is not signed" in proc.stderr and proc.stdout == ""
    ok = petah_process("predict", image, "-b", bb, "-p", path, "--trust", keys, "--require-signed", "--json")
    assert "parts" in one_json(ok)["tasks"]


def test_station_with_require_signed_installs_only_trusted_packages(setup, tmp_path):
    from petah.serve import ServeConfig, Station

    config = ServeConfig(engine="torch", threads=1, trust=str(setup["trusted"]), require_signed=True)
    signed = fresh(setup)
    sign_package(signed, setup["trusted"] / "release.key")
    station = Station(setup["backbone"], tmp_path / "state", config, packages=[signed])
    assert [t["name"] for t in station.task_list()] == ["parts"]
    with pytest.raises(SignatureError, match="is not signed"):
        station.install(fresh(setup).read_bytes(), "parts")
    assert station.task_list()[0]["previous_version"] is None  # nothing was swapped
    assert len(list((tmp_path / "state" / "packages").iterdir())) == 1  # nor kept


@pytest.mark.parametrize("slot, needle", [
    ("not json", "not valid JSON"),
    ("[]", "list of 1..16"),
    ("1" * 5000, "over"),
    ("[" + "1" * 3000 + "]", "keyid"),
    (json.dumps([{"keyid": "ab", "sig": "x"}]), "keyid"),
    (json.dumps([{"keyid": "a" * 64, "sig": "x"}] * 17), "list of 1..16"),
    (json.dumps([{"keyid": "a" * 64, "sig": "%%%"}]), "only by key"),
])
def test_hostile_signature_slots_are_one_line_refusals(setup, slot, needle):
    package = read_package(fresh(setup))
    package.signature = slot
    with pytest.raises(SignatureError, match=needle):
        policy(setup).check(package, "p")


def test_packages_in_memory_are_hashed_again_and_format_1_is_refused(setup):
    from pathlib import Path

    signed = fresh(setup)
    sign_package(signed, setup["trusted"] / "release.key")
    package = read_package(signed)
    key = next(k for k in package.tensors if k.startswith("head/"))
    package.tensors[key] = package.tensors[key] + 1.0  # edited in memory, never written or re-hashed
    with pytest.raises(SignatureError, match="do not match its content hash"):
        Runtime(setup["backbone"], trust=policy(setup)).load(package)
    v1 = Path(__file__).parent / "fixtures" / "v1-attn-lora.petah"
    with pytest.warns(PetahWarning):
        old = read_package(v1)
    with pytest.raises(SignatureError, match="format-1"):
        policy(setup).check(old, "p")


# --- every command that reads a package takes --trust / --require-signed ----------------------
def petah_here(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The CLI's own entry point (``petah.cli.main``: its exit codes and one-line errors) in this
    process: a process start per case would cost seconds."""
    import sys
    import warnings

    from petah.cli import main

    monkeypatch.setattr(sys, "argv", ["petah", *map(str, args)])
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() installs its own printer
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def small_task(setup, tmp_path_factory):
    """A backbone file whose merged ONNX export takes about a second, an unsigned and a signed
    package for it, and images of the packages' classes."""
    from PIL import Image

    from petah.backbones import save_backbone

    root = tmp_path_factory.mktemp("reading")
    torch.manual_seed(0)
    backbone = create_backbone("mobilenetv3_small_050", 32)
    save_backbone(backbone, root / "bb.safetensors")
    for name in ("unsigned", "signed"):
        write_package(root / f"{name}.petah", synthetic_package(backbone, name, PlanConfig(rank=2), classes=3))
    sign_package(root / "signed.petah", setup["trusted"] / "release.key")
    for label in "012":
        (root / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (90 * i, 80 * int(label), 20)).save(root / "data" / label / f"{i}.png")
    return root


READING_COMMANDS = {  # verb -> its arguments for (package, backbone file, output folder)
    "inspect": lambda package, backbone, out: ["inspect", package],
    "upgrade": lambda package, backbone, out: ["upgrade", package, "-o", out / "upgraded.petah"],
    "eval": lambda package, backbone, out: ["eval", package, "-b", backbone, package.parent / "data",
                                            "--val-split", "0.5", "--confusion-png", out / "confusion.png"],
    "export": lambda package, backbone, out: ["export", package, "-b", backbone, "-o", out / "onnx"],
}


@pytest.mark.parametrize("verb", READING_COMMANDS)
def test_commands_that_read_a_package_require_signed(setup, small_task, tmp_path, monkeypatch, capsys, verb):
    """Unsigned: one line, exit 2, nothing written, refused before the backbone loads (the backbone
    named is missing, and that is not the error). Signed by a trusted key: the command runs."""
    args = READING_COMMANDS[verb]
    trust = ["--trust", setup["trusted"], "--require-signed", "--json"]
    refused = args(small_task / "unsigned.petah", tmp_path / "absent.safetensors", tmp_path)
    code, out, err = petah_here(monkeypatch, capsys, *refused, *trust)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: package ") and "unsigned.petah is not signed" in err
    assert list(tmp_path.iterdir()) == []
    code, out, err = petah_here(monkeypatch, capsys, *args(small_task / "signed.petah", small_task / "bb.safetensors",
                                                            tmp_path), *trust)
    assert code == 0, err
    report = json.loads(out)
    if verb == "inspect":
        assert report["signature_verified"] is True
    else:
        assert list(tmp_path.iterdir())  # the upgraded package, the confusion PNG, the ONNX folder
