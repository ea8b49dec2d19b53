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
    device_station["answers"] = rows
    # the same station under a budget for one merged task: the rest on the shared base, the same answers
    root = device_station["root"]
    with station_process("--demo", "--engine", "device", "--state-dir", str(root / "lean"), "--threads", "1",
                         "--memory-budget-mb", "32") as (_, url):
        lean = StationClient(url)
        forms = sorted(t["held"]["form"] for t in lean.tasks())
        assert forms.count("merged") == 1 and forms.count("shared base") == 4, forms
        memory = lean.request("GET", "/v1/stats").json()["memory"]
        assert memory["held_bytes"] <= memory["budget_bytes"] == 32 * 2**20
        answers = lean.predict(images, list(tasks)).json()["images"]
    for have, want in zip(answers, rows, strict=True):
        for name, row in want["tasks"].items():
            assert _close(have["tasks"][name], row), name


def _close(have: object, want: object) -> bool:
    """Equal answers, numbers within 0.01 (the base and merged graphs' raw outputs differ by ~1e-6;
    a box's corners are rounded to 0.01); masks and maps (PNGs) not compared."""
    if isinstance(want, dict):
        return isinstance(have, dict) and set(have) == set(want) and all(
            _close(have[k], v) for k, v in want.items() if not k.endswith("_png"))
    if isinstance(want, list):
        return isinstance(have, list) and len(have) == len(want) and all(map(_close, have, want))
    if isinstance(want, float):
        return abs(have - want) <= 0.01
    return have == want


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


@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="streams need ffmpeg (apt-get install ffmpeg)")
def test_the_line_runs_on_the_device_install(device_station, tmp_path):
    """A triggered stream answered by regions and a watched folder, added through the admin API,
    with a JSON-lines sink: the line on an install without torch."""
    from petah.bench.fleet import wait_for

    client = StationClient(device_station["url"])
    clip = tmp_path / "clip.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x48:rate=25",
                    "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip)], check=True, timeout=60)
    (tmp_path / "camera").mkdir()
    sources = {"clip": {"uri": str(clip), "loop": True, "trigger": "http", "tasks": ["digits"],
                        "regions": [{"name": "a", "box": [0, 0, 32, 48]}, {"name": "b", "box": [32, 0, 32, 48],
                                                                          "tasks": ["defects"]}]},
               "drop": {"uri": f"folder:{tmp_path / 'camera'}", "tasks": ["textures"]}}
    try:
        for name, body in sources.items():
            made = client.request("PUT", f"/v1/sources/{name}", json.dumps(body).encode(), token=ADMIN)
            assert made.status == 200, made.body
        assert wait_for(lambda: client.request("GET", "/v1/sources").json()["sources"][0]["state"] == "streaming", 30)
        answer = client.request("POST", "/v1/sources/clip/trigger", b'{"id": "p1"}')
        assert answer.status == 200, answer.body
        assert sorted((r["region"], r["task"], r["trigger"]) for r in answer.json()["results"]) == [
            ("a", "digits", "p1"), ("b", "defects", "p1")]
        (tmp_path / "camera" / "x.png").write_bytes(png(5))
        assert wait_for(lambda: (tmp_path / "camera" / "done" / "x.png").exists(), 20)
    finally:
        for name in sources:
            client.request("DELETE", f"/v1/sources/{name}", token=ADMIN)


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


@pytest.fixture(scope="module")
def device_gate():
    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = demo_device_backbone()
    return backbone, DeviceEngine(backbone, threads=1)


def test_the_golden_set_gate_scores_on_the_device(tmp_path, device_gate):
    from petah.errors import PetahError
    from petah.fleet.gate import score_versions

    backbone, engine = device_gate
    golden = tmp_path / "golden"
    for label in ("3", "7"):
        (golden / "digits" / label).mkdir(parents=True)
        for i in range(3):
            (golden / "digits" / label / f"{i}.png").write_bytes(png(10 * int(label) + i))
    scores = score_versions(backbone, {"current": PACKAGES["digits"], "candidate": PACKAGES["digits"]}, golden, engine)
    assert scores["current"].metric == "accuracy" and scores["current"].value == scores["candidate"].value
    assert 0 <= scores["current"].value <= 100 and scores["current"].seconds > 0
    assert score_versions(backbone, {"current": PACKAGES["textures"]}, golden, engine) is None  # no set for it
    _mask_set(golden / "defects")  # a dense set is read strictly, as on the full install: a bad sample is named
    Image.fromarray(np.full((64, 64), 9, dtype=np.uint8)).save(golden / "defects" / "masks" / "1.png")
    with pytest.raises(PetahError, match=r"1\.png: mask value 9 is not a class index"):
        score_versions(backbone, {"current": PACKAGES["defects"]}, golden, engine)


def _mask_set(folder) -> None:
    """defects' layout: images/ + masks/ + classes.txt; a scratch, a spot, one ignored pixel."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    (folder / "classes.txt").write_text("background\nscratch\nspot\ncrack\n")
    for i in range(3):
        (folder / "images" / f"{i}.png").write_bytes(png(40 + i))
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[8 + i : 40, 20:23] = 1
        mask[44:54, 40 + i : 50] = 2
        mask[0, 0] = 255
        Image.fromarray(mask).save(folder / "masks" / f"{i}.png")


def _coco_set(folder) -> None:
    """digit-boxes' layout: annotations.json (COCO, categories 0-9) beside its images."""
    folder.mkdir(parents=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i, "name": str(i)} for i in range(10)]}
    for i in range(3):
        (folder / f"{i}.png").write_bytes(png(50 + i))
        coco["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        for j, (x, y, side) in enumerate([(4, 6, 20), (34 + i, 30, 24)]):
            coco["annotations"].append({"id": 2 * i + j, "image_id": i, "category_id": (i + j) % 10,
                                        "bbox": [x, y, side, side]})
    (folder / "annotations.json").write_text(json.dumps(coco))


def _anomaly_set(folder, defective: bool = True) -> None:
    """surfaces' layout: good/ and a defect folder, its masks under ground_truth/."""
    folders = {"good": (60, 61), "scratch": (62, 63)} if defective else {"good": (60, 61, 62)}
    for name, seeds in folders.items():
        (folder / name).mkdir(parents=True)
        for seed in seeds:
            (folder / name / f"{seed}.png").write_bytes(png(seed))
    if defective:
        (folder / "ground_truth" / "scratch").mkdir(parents=True)
        for seed in (62, 63):
            mask = np.zeros((64, 64), dtype=np.uint8)
            mask[10:20, 10:40] = 255
            Image.fromarray(mask).save(folder / "ground_truth" / "scratch" / f"{seed}_mask.png")


@pytest.mark.parametrize("task, write, metric", [
    ("defects", _mask_set, "mIoU"),
    ("digit-boxes", _coco_set, "mAP50"),
    ("surfaces", _anomaly_set, "image_auroc"),
    ("surfaces", lambda folder: _anomaly_set(folder, defective=False), "accuracy"),
], ids=["segmentation", "detection", "anomaly", "anomaly, good images only"])
def test_the_golden_set_gate_scores_every_task_kind_on_the_device(tmp_path, device_gate, task, write, metric):
    from petah.fleet.gate import score_versions

    backbone, engine = device_gate
    write(tmp_path / task)
    scores = score_versions(backbone, {"current": PACKAGES[task], "candidate": PACKAGES[task]}, tmp_path, engine)
    assert {s.metric for s in scores.values()} == {metric}
    assert 0 <= scores["current"].value <= 100 and scores["current"].value == scores["candidate"].value
    assert scores["current"].seconds > 0


def test_auroc_counts_ties_half_and_keeps_large_distances_apart():
    from petah.device.metrics import auroc

    truth = np.array([False, False, True, True])
    # the positives beat 0.1 (2 pairs) and 0.4 (1 pair), and tie the other 0.4 (half a pair): 3.5 of 4
    assert auroc(np.array([0.1, 0.4, 0.4, 0.8]), truth) == 0.875
    assert auroc(np.array([2.0, 3.0, 3.0, 5.0]), truth) == 0.875  # distances: only their order counts
    assert auroc(np.array([20.0, 30.0]), np.array([False, True])) == 1.0  # no squash into a tie
    assert auroc(np.array([0.2, 0.9]), np.array([True, True])) is None  # one class only: no curve


def test_mean_iou_leaves_out_ignored_pixels_and_absent_classes():
    from petah.device.metrics import class_iou, confusion_matrix, mean_iou

    target = np.array([[0, 0, 0, 1, 255]])
    predicted = np.array([[0, 0, 1, 1, 2]])  # class 2 only where the target is ignored: absent
    confusion = confusion_matrix(target, predicted, 3)
    assert confusion.sum() == 4 and confusion[:, 2].sum() == 0
    iou = class_iou(confusion)
    assert iou[0] == np.float32(2 / 3) and iou[1] == np.float32(1 / 2) and np.isnan(iou[2])
    assert mean_iou(confusion) == pytest.approx(7 / 12, abs=1e-7)
    assert mean_iou(confusion_matrix(np.full((2, 2), 255), np.zeros((2, 2)), 3)) == 0.0  # nothing to score


def test_map50_counts_a_duplicate_as_false_and_a_missed_box_against_recall():
    from petah.device.metrics import map50

    truth = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float32), "labels": np.array([0, 0])}]
    found = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 11], [40, 40, 50, 50]], dtype=np.float32),
              "scores": np.array([0.9, 0.8, 0.7], dtype=np.float32), "labels": np.array([0, 0, 1])}]
    # the first box finds the first ground truth (recall 0.5 at precision 1), its duplicate is a false
    # positive and the second box is never found: precision 1 at the 51 recall points up to 0.5, 0 above;
    # class 1 has no ground truth and stays out of the mean
    assert map50(found, truth) == pytest.approx(51 / 101, abs=1e-12)
    assert map50(found, [{"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, int)}]) == -1.0


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


MB = 2**20


@pytest.mark.parametrize("tasks, budget, base, merged", [
    # (name, merged bytes, base bytes or None, traffic, merged now)
    ([("a", 10, 1, 5.0, False), ("b", 10, 1, 1.0, False)], 100, 10, {"a", "b"}),  # all fit
    ([("a", 10, 1, 5.0, False), ("b", 10, 1, 1.0, False)], 22, 10, {"a", "b"}),  # both merged: no base graph
    ([("a", 10, 1, 5.0, False), ("b", 10, 1, 1.0, False)], 18, 5, {"a"}),  # one + the base: the busier
    ([("a", 10, 1, 5.0, False), ("b", 10, 1, 9.0, False)], 18, 5, {"b"}),
    ([("a", 10, 1, 5.0, True), ("b", 10, 1, 6.0, False)], 18, 5, {"a"}),  # within the switch margin: stays
    ([("a", 10, 1, 5.0, True), ("b", 10, 1, 7.0, False)], 18, 5, {"b"}),  # past it: changes
    ([("a", 10, None, 0.0, True), ("b", 10, 1, 9.0, False)], 18, 5, {"a"}),  # a cannot be held on the base
    ([("a", 30, 1, 9.0, False), ("b", 5, 1, 1.0, False)], 20, 10, {"b"}),  # a does not fit, a smaller one does
    ([("a", 10, 1, 1.0, False)], 5, 10, set()),  # over budget even on the base: as lean as it goes
], ids=["all fit", "no base needed", "the busier", "the other busier", "margin holds", "margin passed", "pinned",
        "smaller fits", "nothing fits"])
def test_the_busiest_tasks_are_held_merged_within_the_budget(tasks, budget, base, merged):
    from petah.serve.holding import Holding, plan_merged

    assert plan_merged([Holding(*t) for t in tasks], budget, base) == merged


def test_traffic_halves_every_half_life():
    from petah.serve.holding import Traffic

    now = [0.0]
    traffic = Traffic(half_life_s=10, clock=lambda: now[0])
    traffic.add("a", 8)
    now[0] = 20.0
    traffic.add("b", 1)
    assert traffic.scores() == pytest.approx({"a": 2.0, "b": 1.0})
    traffic.forget("a")
    assert set(traffic.scores()) == {"b"}


def test_tasks_on_the_shared_base_answer_as_merged_ones_and_traffic_moves_them():
    """Under a budget for one merged task, the rest are held on the shared base (about their
    package each); their raw outputs equal the merged graphs'; a base task that gets the traffic is
    merged beside inference and takes the merged place, answers unchanged."""
    import time

    from petah.serve import demo_device_backbone
    from petah.serve.engine import DeviceEngine

    backbone = demo_device_backbone()
    merged, held = DeviceEngine(backbone, threads=1), DeviceEngine(backbone, threads=1,
                                                                   memory_budget_bytes=2.5 * backbone.resident_bytes)
    held.rebalance_s = 0.0
    for engine in (merged, held):
        for name, path in PACKAGES.items():
            engine.install(engine.prepare(path, name))
    forms = {name: held.held(name)["form"] for name in PACKAGES}
    assert sorted(forms.values()).count("merged") == 1 and sorted(forms.values()).count("shared base") == 4, forms
    memory = held.memory()
    assert memory["held_bytes"] <= held.budget and memory["merged_tasks"] == 1
    for name in PACKAGES:
        assert held.held(name).get("adapter_bytes", 0) <= 3 * PACKAGES[name].stat().st_size
    images = [np.random.default_rng(i).integers(0, 256, (3, 64, 64), dtype=np.uint8) for i in range(2)]

    def raw(engine, name):
        task = engine.tasks[name]
        return engine.outputs(task, task.preprocess.array_batch(images))

    for name in PACKAGES:
        assert np.abs(raw(held, name) - raw(merged, name)).max() < 1e-4, name
    busy = next(name for name, form in forms.items() if form == "shared base" and name != "surfaces")
    want = merged.run(images, [busy], 3)[busy][0]["label"]
    deadline = time.monotonic() + 30
    while held.held(busy)["form"] != "merged" and time.monotonic() < deadline:
        assert held.run(images, [busy], 3)[busy][0]["label"] == want
        time.sleep(0.01)
    assert held.held(busy)["form"] == "merged"
    assert held.memory()["merged_tasks"] == 1 and held.memory()["held_bytes"] <= held.budget
    assert np.abs(raw(held, busy) - raw(merged, busy)).max() < 1e-4
