"""The device install: the station, package reading and the CLI's device verbs without the
training stack. ``.ci/run`` runs this file in a second environment made with ``pip install .``
(no torch); it imports nothing from torch, so it runs on the full install as well."""

import base64
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CLI_ENV
from petah.serve import demo_packages
from petah.serve.client import StationClient, station_process

pytestmark = pytest.mark.device
TRAINING_STACK = ("torch", "torchvision", "timm", "peft", "transformers", "scipy", "torchmetrics", "matplotlib",
                  "torch_pruning")
ADMIN = "admin-token-for-device-tests-0123456789"
PACKAGES = {p.stem: p for p in demo_packages()}


def png(seed: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def imported_modules(*args: str) -> set[str]:
    """Every module a fresh interpreter imports to run ``args`` (``python -X importtime``)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *args], capture_output=True, text=True,
                          env=CLI_ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("args", [
    ("-c", "import petah.serve, petah.fleet.agent, petah.packages, petah.device"),
    ("-m", "petah", "serve", "--help"),
    ("-m", "petah", "verify", "--help"),
    ("-m", "petah", "--help"),
], ids=["library", "serve --help", "verify --help", "petah --help"])
def test_the_device_side_never_imports_the_training_stack(args):
    heavy = sorted(m for m in imported_modules(*args) if m.split(".")[0] in TRAINING_STACK)
    assert heavy == [], heavy[:5]


@pytest.fixture(scope="module")
def device_station(tmp_path_factory):
    root = tmp_path_factory.mktemp("device")
    (root / "admin").write_text(ADMIN + "\n")
    with station_process("--demo", "--engine", "device", "--state-dir", str(root / "state"), "--admin-token-file",
                         str(root / "admin"), "--threads", "1", "--max-wait-ms", "3") as (proc, url):
        yield {"url": url, "proc": proc, "root": root}


def test_the_demo_answers_on_the_device_engine(device_station):
    client = StationClient(device_station["url"])
    tasks = {t["name"]: t for t in client.tasks()}
    assert set(tasks) == {"digits", "textures", "defects", "digit-boxes", "surfaces"}
    assert all(t["held"]["form"] == "merged" and t["held"]["own_bytes"] > 0 for t in tasks.values())
    images = [("a.png", png(0)), ("b.png", png(1, size=80))]
    first = client.predict(images, list(tasks))
    assert first.status == 200, first.body
    rows = first.json()["images"]
    assert len(rows) == 2
    for row, size in zip(rows, (64, 80), strict=True):
        digits = row["tasks"]["digits"]
        assert digits["label"] in tasks["digits"]["labels"] and 0 < digits["score"] <= 1
        assert [t["score"] for t in digits["top"]] == sorted((t["score"] for t in digits["top"]), reverse=True)
        defects = row["tasks"]["defects"]
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(defects["mask_png"]))))
        assert mask.shape == (size, size) and defects["mask_size"] == [size, size]
        assert set(np.unique(mask)) <= set(range(len(tasks["defects"]["labels"])))
        assert abs(sum(defects["pixels"].values()) - 1) < 1e-4
        surfaces = row["tasks"]["surfaces"]
        assert surfaces["label"] == ("anomaly" if surfaces["score"] > surfaces["threshold"] else "good")
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(surfaces["anomaly_map_png"]))))
        assert heat.shape == (size, size) and surfaces["map_size"] == [size, size]
        for box in row["tasks"]["digit-boxes"]["boxes"]:
            assert box["label"] in tasks["digit-boxes"]["labels"] and 0.2 < box["score"] <= 1
            x0, y0, x1, y1 = box["box"]
            assert 0 <= x0 <= x1 <= size and 0 <= y0 <= y1 <= size
    assert client.predict(images, list(tasks)).json()["images"] == rows  # deterministic


def test_swap_rollback_and_delete_on_the_device_engine(device_station):
    client = StationClient(device_station["url"])
    image = [("a.png", png(2))]

    def answer(task: str) -> tuple:
        row = client.predict(image, [task]).json()["images"][0]["tasks"][task]
        return row["version"], [(t["label"], t["score"]) for t in row["top"]]

    digits, textures = answer("digits"), answer("textures")
    assert client.install("swap", PACKAGES["textures"].read_bytes(), ADMIN).status in (200, 201)
    assert answer("swap") == textures
    assert client.install("swap", PACKAGES["digits"].read_bytes(), ADMIN).status in (200, 201)
    assert answer("swap") == digits  # hot swap: the new version answers
    assert client.rollback("swap", ADMIN).status == 200
    assert answer("swap") == textures  # and the one before it is back
    assert client.delete("swap", ADMIN).status == 200
    assert "swap" not in {t["name"] for t in client.tasks()}
    # a dense package from before format 3 (no head graph): refused, saying how to upgrade it
    from petah.packages import encode_package, read_package

    old = read_package(PACKAGES["defects"])
    del old.tensors["graph/head"]
    old.manifest.head = {k: v for k, v in old.manifest.head.items() if k not in ("graph", "graph_inputs")}
    refused = client.install("old-defects", encode_package(old), ADMIN)
    assert refused.status == 400 and "petah upgrade" in refused.json()["error"]


def test_a_tampered_device_backbone_is_refused_in_one_line(tmp_path):
    from petah.serve import demo_device_files

    source, weights = demo_device_files()
    folder = tmp_path / "device"
    shutil.copytree(source, folder)
    shutil.copy(weights, folder / "weights.safetensors")
    graph = bytearray((folder / "backbone.onnx").read_bytes())
    graph[-10] ^= 1
    (folder / "backbone.onnx").write_bytes(bytes(graph))
    proc = subprocess.run([sys.executable, "-m", "petah", "serve", "-b", str(folder), "--state-dir",
                           str(tmp_path / "state")], capture_output=True, text=True, env=CLI_ENV, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "backbone.onnx was modified or is corrupt" in lines[0]


def test_inspect_works_on_the_device_install():
    proc = subprocess.run([sys.executable, "-m", "petah", "inspect", str(PACKAGES["digits"]), "--json"],
                          capture_output=True, text=True, env=CLI_ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["task"]["name"] == "digits"


def test_build_verbs_say_they_need_the_full_install():
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the full install: build verbs run here")
    proc = subprocess.run([sys.executable, "-m", "petah", "adapt", "builtin:digits"], capture_output=True, text=True,
                          env=CLI_ENV, timeout=120)
    assert proc.returncode == 2 and "needs the full install" in proc.stderr


def test_the_golden_set_gate_scores_on_the_device(tmp_path):
    from petah.errors import PetahError
    from petah.fleet.gate import score_versions
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = demo_device_backbone()
    engine = DeviceEngine(backbone, threads=1)
    golden = tmp_path / "golden"
    for label in ("3", "7"):
        (golden / "digits" / label).mkdir(parents=True)
        for i in range(3):
            (golden / "digits" / label / f"{i}.png").write_bytes(png(10 * int(label) + i))
    scores = score_versions(backbone, {"current": PACKAGES["digits"], "candidate": PACKAGES["digits"]}, golden, engine)
    assert scores["current"].metric == "accuracy" and scores["current"].value == scores["candidate"].value
    assert 0 <= scores["current"].value <= 100 and scores["current"].seconds > 0
    assert score_versions(backbone, {"current": PACKAGES["textures"]}, golden, engine) is None  # no set for it
    (golden / "defects" / "images").mkdir(parents=True)
    with pytest.raises(PetahError, match="needs the full install"):
        score_versions(backbone, {"current": PACKAGES["defects"]}, golden, engine)


def _with_head_graph(name: str, edit) -> "object":
    """A demo package whose head graph ``edit`` changed (the package re-hashed, as a forger would)."""
    import onnx

    from petah.packages import read_package

    package = read_package(PACKAGES[name])
    graph = onnx.load_from_string(package.tensors["graph/head"].tobytes())
    edit(graph)
    package.tensors["graph/head"] = np.frombuffer(graph.SerializeToString(), dtype=np.uint8).copy()
    return package


def _external(graph) -> None:
    from onnx import TensorProto

    tensor = TensorProto(name="leak", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "etc/hostname"
    graph.graph.initializer.append(tensor)


def _contrib(graph) -> None:
    from onnx import helper

    first = graph.graph.node[0]
    graph.graph.node.insert(1, helper.make_node("FastGelu", [first.output[0]], ["gelu"], domain="com.microsoft"))


def _wrong_grid(package) -> None:
    package.manifest.head = {**package.manifest.head, "grids": [3, 2, 1]}


@pytest.mark.parametrize("name, edit, error", [
    ("defects", _external, "outside file"),
    ("digit-boxes", _contrib, "runs com.microsoft.FastGelu"),
], ids=["external data (would read a device file)", "a contrib operator"])
def test_a_head_graph_that_does_more_than_a_head_is_refused(name, edit, error):
    from petah.device import task_graph
    from petah.errors import PetahError
    from petah.serve import demo_device_backbone

    with pytest.raises(PetahError, match=error):
        task_graph(demo_device_backbone(), _with_head_graph(name, edit), "the package")


def test_a_graph_whose_output_does_not_fit_its_manifest_is_refused_at_install(tmp_path):
    from petah.errors import PetahError
    from petah.packages import read_package, write_package
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    package = read_package(PACKAGES["digit-boxes"])
    _wrong_grid(package)
    path = write_package(tmp_path / "boxes.petah", package)
    with pytest.raises(PetahError, match="does not fit its manifest"):
        DeviceEngine(demo_device_backbone(), threads=1).prepare(path, None)
