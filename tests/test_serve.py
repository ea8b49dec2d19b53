"""The station (`petah serve`): real uvicorn processes on 127.0.0.1, each test bounded in count and time."""

import base64
import hashlib
import io
import os
import random
import re
import shutil
import signal
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import chromium_page, chromium_path
from petah.backbones import create_backbone, demo_backbone_path
from petah.errors import PetahError
from petah.packages import encode_package, read_package
from petah.plans import PlanConfig
from petah.runtime import Runtime
from petah.serve import ServeConfig, demo_packages
from petah.serve.client import StationClient, multipart, station_process
from petah.serve.state import Entry, StateDir
from petah.testing import synthetic_package

ADMIN = "admin-token-for-tests-0123456789"
DIGITS = next(p for p in demo_packages() if p.stem == "digits")


def version_of(package: bytes) -> str:
    return hashlib.sha256(package).hexdigest()[:12]


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def digit_image(seed: int = 0, size: int = 64) -> bytes:
    """A handwritten digit (scikit-learn's) drawn large on a noisy canvas."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    glyph = digits.images[seed % len(digits.images)] / 16.0
    canvas = rng.integers(0, 40, (size, size)).astype(np.float64)
    big = np.kron(glyph, np.ones((4, 4)))
    y, x = rng.integers(0, size - big.shape[0], 2)
    canvas[y:y + big.shape[0], x:x + big.shape[1]] += 215 * big
    return png(np.clip(canvas, 0, 255).astype(np.uint8))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's calling card)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    (root / "admin").write_text(ADMIN + "\n")
    (root / "api").write_text("api-token-for-tests-0123456789\n")
    return root


@pytest.fixture(scope="module")
def demo_station(tmp_path_factory, tokens):
    state = tmp_path_factory.mktemp("demo-state")
    with station_process("--demo", "--state-dir", str(state), "--admin-token-file", str(tokens / "admin"),
                         "--max-wait-ms", "3", "--max-upload-mb", "2", "--threads", "1", "--engine", "torch"
                         ) as (proc, url):
        yield {"url": url, "proc": proc, "state": state}


@pytest.fixture(scope="module")
def onnx_station(tmp_path_factory, tokens):
    state = tmp_path_factory.mktemp("onnx-state")
    with station_process("--demo", "--state-dir", str(state), "--admin-token-file", str(tokens / "admin"),
                         "--threads", "1", "--engine", "onnx") as (proc, url):
        yield {"url": url, "proc": proc, "state": state}


@pytest.fixture(scope="module")
def second_digits(tmp_path_factory):
    """Another version of a digits task on the demo backbone (random adapters) and the outputs a
    fresh runtime gives for each version: what every station answer must equal."""
    backbone = create_backbone(weights=str(demo_backbone_path()))
    labels = list(read_package(DIGITS).manifest.labels)
    package = synthetic_package(backbone, "digits", PlanConfig(preset="petah"), classes=len(labels), seed=5,
                                labels=labels)
    return encode_package(package), backbone


def reference_scores(backbone, package_bytes: bytes, images: list[bytes], tmp: Path) -> list[list[float]]:
    from petah.data.images import load_image_modes

    path = tmp / "ref.petah"
    path.write_bytes(package_bytes)
    runtime = Runtime(backbone)
    runtime.load(path, name="swap")
    mode = runtime.tasks["swap"].manifest.intensity
    rows = runtime.run([load_image_modes(data, (mode,))[mode] for data in images], top_k=3)["swap"]
    return [[t["score"] for t in row["top"]] for row in rows]


# --- the API ------------------------------------------------------------------------------------
def test_tasks_contract_and_predict_every_kind(demo_station):
    client = StationClient(demo_station["url"])
    tasks = client.tasks()
    assert [t["name"] for t in tasks] == ["defects", "digit-boxes", "digits", "surfaces", "textures"]
    for row in tasks:
        assert set(row) == {"name", "kind", "labels", "version", "bytes", "metrics", "loaded_at", "previous_version",
                            "candidate_version", "held", "drift"}
        assert row["held"] == {"form": "adapters", "engine": "torch"}
        assert row["drift"]["state"] in ("warming up", "ok") and row["drift"]["reference"]["images"] > 0
        assert len(row["version"]) == 12 and row["bytes"] > 100_000 and row["previous_version"] is None
    kinds = {t["name"]: t["kind"] for t in tasks}
    assert kinds == {"defects": "segmentation", "digit-boxes": "detection", "digits": "classification",
                     "surfaces": "anomaly", "textures": "classification"}

    image = digit_image(1, size=96)
    reply = client.predict([("one.png", image), ("two.png", digit_image(2))])
    assert reply.status == 200, reply.body
    body = reply.json()
    assert [i["name"] for i in body["images"]] == ["one.png", "two.png"] and body["latency_ms"] > 0
    versions = {t["name"]: t["version"] for t in tasks}
    first = body["images"][0]["tasks"]
    assert {name: r["version"] for name, r in first.items()} == versions
    top = first["digits"]["top"]
    assert len(top) == 3 and top[0]["label"] == first["digits"]["label"]
    assert all(a["score"] >= b["score"] for a, b in zip(top, top[1:], strict=False))
    mask = Image.open(io.BytesIO(base64.b64decode(first["defects"]["mask_png"])))
    assert mask.size == (96, 96) and first["defects"]["mask_size"] == [96, 96]  # the image's own size
    shares = np.bincount(np.asarray(mask).ravel(), minlength=4) / mask.size[0] / mask.size[1]
    labels = next(t["labels"] for t in tasks if t["name"] == "defects")
    assert {labels[i]: round(float(s), 6) for i, s in enumerate(shares) if s > 0} == first["defects"]["pixels"]
    digit_labels = next(t["labels"] for t in tasks if t["name"] == "digit-boxes")
    for found in first["digit-boxes"]["boxes"]:
        x0, y0, x1, y1 = found["box"]
        assert -1 <= x0 <= x1 <= 97 and -1 <= y0 <= y1 <= 97 and found["label"] in digit_labels

    surfaces = first["surfaces"]  # anomaly: score, decision and the map as a grey PNG at the image's size
    picture = Image.open(io.BytesIO(base64.b64decode(surfaces["anomaly_map_png"])))
    assert picture.mode == "L" and picture.size == (96, 96) and surfaces["map_size"] == [96, 96]
    assert surfaces["anomalous"] == (surfaces["score"] > surfaces["threshold"])

    only = client.predict([("one.png", image)], tasks=["digits"]).json()["images"][0]["tasks"]
    # same answer alone as with every task (in a batch of one instead of two: on an AVX2-only CPU the
    # kernels sum in another order, and a score moved by 1e-6)
    assert list(only) == ["digits"] and [t["label"] for t in only["digits"]["top"]] == [t["label"] for t in top]
    assert [t["score"] for t in only["digits"]["top"]] == pytest.approx([t["score"] for t in top], abs=1e-5)
    raw = client.request("POST", "/v1/predict?tasks=textures", image, {"Content-Type": "image/png"}).json()
    assert list(raw["images"][0]["tasks"]) == ["textures"]


def test_health_metrics_and_openapi(demo_station):
    client = StationClient(demo_station["url"])
    client.predict([("a.png", digit_image(3))], tasks=["digits"])
    assert client.request("GET", "/healthz").json() == {"status": "ok", "tasks": 5}
    text = client.request("GET", "/metrics").body.decode()
    for series in ('petah_task_requests_total{task="digits"}', "petah_task_latency_seconds_bucket",
                   "petah_batch_images_bucket", "petah_tasks_loaded 5.0", "petah_resident_bytes",
                   "petah_swap_pause_seconds_bucket", "process_resident_memory_bytes"):
        assert series in text, series
    schema = client.request("GET", "/openapi.json").json()
    assert {"/v1/predict", "/v1/tasks", "/v1/tasks/{name}", "/v1/tasks/{name}/rollback"} <= set(schema["paths"])
    assert client.request("GET", "/docs").status == 404  # FastAPI's docs page needs a CDN: off (test_hostile)
    page = client.request("GET", "/")
    assert page.status == 200 and b"petah station" in page.body
    assert client.request("GET", "/static/station.js").status == 200


@pytest.mark.parametrize("case, status, needle", [
    ("text", 400, "cannot read image notes.txt"),
    ("truncated", 400, "cannot read image cut.png"),
    ("bomb", 400, "over petah's limit"),
    ("many-pixels", 400, "32.0 MP together"),
    ("no-task-named", 400, "names no task"),
    ("unknown-task", 404, "no task 'nope'"),
    ("no-image", 400, "no image"),
    ("json", 415, "multipart/form-data"),
    ("too-large", 413, "over the limit"),
])
def test_bad_requests_get_one_json_error(demo_station, case, status, needle):
    client = StationClient(demo_station["url"])
    image = digit_image(4)
    if case == "text":
        reply = client.predict([("notes.txt", b"hello, not an image")])
    elif case == "truncated":
        reply = client.predict([("cut.png", image[: len(image) // 2])])
    elif case == "bomb":
        reply = client.predict([("bomb.png", bomb_png())])
    elif case == "many-pixels":  # two small files whose headers claim 16 MP each
        reply = client.predict([("a.png", bomb_png(4000, 4000)), ("b.png", bomb_png(4000, 4000))])
    elif case == "no-task-named":
        reply = client.request("POST", "/v1/predict?tasks=,", image, {"Content-Type": "image/png"})
    elif case == "unknown-task":
        reply = client.predict([("a.png", image)], tasks=["nope"])
    elif case == "no-image":
        body, content_type = multipart([], {"tasks": "digits"})
        reply = client.request("POST", "/v1/predict", body, {"Content-Type": content_type})
    elif case == "json":
        reply = client.request("POST", "/v1/predict", b"{}", {"Content-Type": "application/json"})
    else:
        reply = client.predict([("big.png", image + os.urandom(3 * 1024 * 1024))])
    assert reply.status == status, reply.body
    assert needle in reply.json()["error"] and "Traceback" not in reply.body.decode()


def test_admin_endpoints_need_the_token_and_check_the_backbone(demo_station, tmp_path):
    client = StationClient(demo_station["url"])
    data = DIGITS.read_bytes()
    assert client.install("digits", data, "wrong-token-0123456789").status == 401
    assert client.request("PUT", "/v1/tasks/digits", data).status == 401
    other = create_backbone("efficientformerv2_s0", 64)  # random weights: another fingerprint
    package = encode_package(synthetic_package(other, "digits", PlanConfig(rank=2), classes=10))
    reply = client.install("digits", package, ADMIN)
    assert reply.status == 409, reply.body
    assert other.fingerprint[:12] in reply.json()["error"]
    corrupt = bytearray(data)
    corrupt[-10] ^= 0xFF  # a tensor byte: the content hash no longer matches
    assert client.install("digits", bytes(corrupt), ADMIN).status == 400
    assert client.install("bad name!", data, ADMIN).status in (400, 404)
    assert client.rollback("digits", ADMIN).status == 400  # nothing to roll back to
    assert client.delete("nope", ADMIN).status == 404
    assert [t["version"] for t in client.tasks() if t["name"] == "digits"] == [version_of(data)]
    leftovers = [p.name for p in (demo_station["state"] / "packages").iterdir()]
    assert len(leftovers) == len(demo_packages())  # refused uploads left nothing behind


def test_token_protects_every_endpoint_and_admin_can_be_disabled(tokens, tmp_path):
    api_token = (tokens / "api").read_text().strip()
    with station_process("-b", str(demo_backbone_path()), "--state-dir", str(tmp_path / "s"),
                         "--token-file", str(tokens / "api")) as (_proc, url):
        client = StationClient(url)
        for path in ("/v1/tasks", "/v1/stats", "/metrics"):
            assert client.request("GET", path).status == 401
            assert client.request("GET", path, token=api_token).status == 200
        assert client.request("GET", "/healthz").status == 200  # probes need no token
        reply = client.request("PUT", "/v1/tasks/digits", DIGITS.read_bytes(), token=api_token)
        assert reply.status == 401 and "--admin-token-file" in reply.json()["error"]
        reply = client.predict([("a.png", digit_image())])
        assert reply.status == 401
        client.token = api_token
        assert client.predict([("a.png", digit_image())]).status == 404  # no task served yet
    from petah.packages import generate_keypair, sign_package

    (tmp_path / "keys").mkdir()
    generate_keypair(tmp_path / "keys" / "release")
    signed = tmp_path / "digits.petah"
    signed.write_bytes(DIGITS.read_bytes())
    sign_package(signed, tmp_path / "keys" / "release.key")
    with station_process("-b", str(demo_backbone_path()), "--state-dir", str(tmp_path / "t"),
                         "--token-file", str(tokens / "api"), "--admin-token-file", str(tokens / "admin"),
                         "--trust", str(tmp_path / "keys"), "--require-signed") as (_, url):
        client = StationClient(url, token=api_token)
        assert client.install("digits", signed.read_bytes(), api_token).status == 401  # not the admin token
        refused = client.install("digits", DIGITS.read_bytes(), ADMIN)  # unsigned
        assert refused.status == 403 and "is not signed" in refused.json()["error"]
        assert client.install("digits", signed.read_bytes(), ADMIN).status == 200  # the admin token alone opens
        assert client.predict([("a.png", digit_image())]).status == 200


# --- hot swap under load --------------------------------------------------------------------------
@pytest.mark.parametrize("engine, swaps", [("torch", 100), ("onnx", 12)])  # an onnx install exports a graph
def test_hot_swap_under_load_drops_nothing(request, engine, swaps, second_digits, tmp_path):
    """8 clients predict while a task flips between two versions (>= 100 times on torch): every
    request succeeds, names the version that produced it, and matches a fresh runtime with that
    version (onnx: within ONNX Runtime's float error of it)."""
    station = request.getfixturevalue("demo_station" if engine == "torch" else "onnx_station")
    tolerance = 1e-6 if engine == "torch" else 2e-4
    client = StationClient(station["url"])
    v2_bytes, backbone = second_digits
    v1_bytes = DIGITS.read_bytes()
    assert client.install("swap", v1_bytes, ADMIN).status == 200
    assert client.install("swap", v2_bytes, ADMIN).status == 200
    images = [digit_image(seed) for seed in range(4)]
    expected = {version_of(b): reference_scores(backbone, b, images, tmp_path)
                for b in (v1_bytes, v2_bytes)}
    stop, failures, seen, answered = threading.Event(), [], set(), [0]

    def load(worker: int) -> None:
        try:
            predict_until_stopped(worker)
        except Exception as exc:  # reported by the test, not lost in a thread
            failures.append(("exception", repr(exc)))

    def predict_until_stopped(worker: int) -> None:
        own = StationClient(station["url"])
        i = worker
        while not stop.is_set():
            k = i % len(images)
            reply = own.predict([(f"{k}.png", images[k])], tasks=["swap"])
            i += 1
            if reply.status != 200:
                failures.append((reply.status, reply.body[:200]))
                continue
            result = reply.json()["images"][0]["tasks"]["swap"]
            seen.add(result["version"])
            scores = [t["score"] for t in result["top"]]
            want = expected.get(result["version"])
            # both sides round to 6 decimals: equal values may differ by one unit in the last place
            if want is None or max(abs(a - b) for a, b in zip(scores, want[k], strict=True)) > tolerance + 1e-9:
                failures.append(("mismatch", result["version"], scores, want and want[k]))
            answered[0] += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    done, deadline = 0, time.monotonic() + 120
    try:
        while done < swaps and time.monotonic() < deadline:
            reply = client.rollback("swap", ADMIN)  # flips between the two versions
            assert reply.status == 200, reply.body
            done += 1
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert done >= swaps
    assert failures == []
    assert seen == set(expected) and answered[0] > 100
    text = client.request("GET", "/metrics").body.decode()
    assert 'petah_swaps_total{action="rollback"}' in text
    assert client.delete("swap", ADMIN).status == 200
    assert "swap" not in {t["name"] for t in client.tasks()}


def test_onnx_engine_answers_as_the_torch_engine(demo_station, onnx_station):
    torch_client, onnx_client = StationClient(demo_station["url"]), StationClient(onnx_station["url"])
    assert [(t["name"], t["version"]) for t in onnx_client.tasks()] == [
        (t["name"], t["version"]) for t in torch_client.tasks() if t["name"] != "swap"]
    images = [("a.png", digit_image(8, size=80)), ("b.png", digit_image(9))]
    tasks = ["digits", "textures", "defects"]
    want = torch_client.predict(images, tasks).json()["images"]
    got = onnx_client.predict(images, tasks).json()["images"]
    stats = onnx_client.request("GET", "/v1/stats").json()
    assert stats["engine"] == "onnx"
    for w, g in zip(want, got, strict=True):
        for name in ("digits", "textures"):
            assert g["tasks"][name]["label"] == w["tasks"][name]["label"]
            assert abs(g["tasks"][name]["score"] - w["tasks"][name]["score"]) < 1e-3
        shares_w, shares_g = w["tasks"]["defects"]["pixels"], g["tasks"]["defects"]["pixels"]
        assert all(abs(shares_g.get(c, 0) - f) < 0.01 for c, f in shares_w.items())


# --- fuzz -------------------------------------------------------------------------------------
def test_fuzz_never_gets_a_5xx_and_the_station_stays_up(demo_station):
    rng = random.Random(7)
    client = StationClient(demo_station["url"], timeout=30)
    image = digit_image(5)
    valid, content_type = multipart([("a.png", image)])
    boundary = content_type.split("boundary=")[1]
    paths = ["/v1/predict", "/v1/predict?tasks=digits", "/v1/predict?tasks=,,,", "/v1/tasks/digits", "/v1/tasks",
             "/v1/tasks/%2e%2e/rollback", "/v1/nothing", "/healthz"]
    statuses = []
    for i in range(520):
        kind = i % 8
        headers = {}
        if kind == 0:
            body, headers["Content-Type"] = os.urandom(rng.randint(0, 4000)), content_type
        elif kind == 1:
            body, headers["Content-Type"] = valid[: rng.randint(1, len(valid) - 1)], content_type  # truncated
        elif kind == 2:
            body = valid.replace(b"a.png", os.urandom(8).hex().encode())
            body = body[:60] + os.urandom(rng.randint(1, 50)) + body[60:]
            headers["Content-Type"] = content_type
        elif kind == 3:
            body, headers["Content-Type"] = os.urandom(rng.randint(0, 2000)), rng.choice(
                ["image/png", "text/plain", "application/json", "multipart/form-data", f"multipart/mixed; boundary"
                 f"={boundary}", "", "multipart/form-data; boundary="])
        elif kind == 4:  # a valid envelope around hostile image bytes
            body, headers["Content-Type"] = multipart([("x.png", image[:8] + os.urandom(rng.randint(0, 3000)))])
        elif kind == 5:  # oversized
            body, headers["Content-Type"] = b"0" * (2 * 1024 * 1024 + rng.randint(1, 1000)), content_type
        elif kind == 6:
            body, headers["Content-Type"] = multipart([(f"{n}.png", image) for n in range(40)])  # too many files
        else:
            body, headers["Content-Type"] = os.urandom(rng.randint(0, 500)), "application/octet-stream"
        method = rng.choice(["POST", "POST", "PUT", "GET", "DELETE"]) if kind == 7 else "POST"
        reply = client.request(method, rng.choice(paths) if kind in (3, 7) else "/v1/predict", body, headers)
        statuses.append(reply.status)
        assert reply.status < 500, (i, reply.status, reply.body[:300])
        if reply.status >= 400 and reply.headers.get("content-type", "").startswith("application/json"):
            assert "error" in reply.json()
    assert len(statuses) >= 500 and 200 in statuses and 400 in statuses and 413 in statuses
    assert client.request("GET", "/healthz").status == 200
    assert client.predict([("a.png", image)]).status == 200


# --- state that survives --------------------------------------------------------------------------
def test_state_dir_sweeps_what_an_interrupted_write_left(tmp_path):
    state = StateDir(tmp_path, "f" * 64)
    sha, _ = state.store(DIGITS.read_bytes())
    state.commit({"digits": Entry(sha, None, "now")})
    (tmp_path / ".station.json.abcd1234.tmp").write_text("{")
    (tmp_path / "packages" / f".{'0' * 64}.petah.x1y2z3w4.tmp").write_bytes(b"half")
    state.store(b"stored, never committed")
    reopened = StateDir(tmp_path, "f" * 64)
    assert reopened.entries == {"digits": Entry(sha, None, "now")}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [f"{sha}.petah", "station.json"]
    with pytest.raises(Exception, match="belongs to backbone"):
        StateDir(tmp_path, "e" * 64)


def test_restart_restores_the_set_and_kill_9_mid_install_leaves_a_whole_one(tokens, second_digits, tmp_path):
    state = tmp_path / "state"
    v2_bytes, _ = second_digits
    v1, v2 = version_of(DIGITS.read_bytes()), version_of(v2_bytes)
    common = ("-b", str(demo_backbone_path()), "--state-dir", str(state), "--admin-token-file", str(tokens / "admin"))
    with station_process(*common, "-p", str(DIGITS)) as (_proc, url):
        assert StationClient(url).install("digits", v2_bytes, ADMIN).status == 200
    with station_process(*common) as (_proc, url):  # no -p: the state dir's set
        (row,) = StationClient(url).tasks()
        assert (row["name"], row["version"], row["previous_version"]) == ("digits", v2, v1)
        assert StationClient(url).rollback("digits", ADMIN).status == 200
    outcomes = set()
    for delay in (0.02, 0.08):
        with station_process(*common) as (proc, url):
            before = {t["name"]: t["version"] for t in StationClient(url).tasks()}
            target = v2 if before["digits"] == v1 else v1
            package = v2_bytes if target == v2 else DIGITS.read_bytes()
            sender = threading.Thread(target=lambda u=url, p=package: _ignore_errors(
                lambda: StationClient(u, timeout=10).install("digits", p, ADMIN)))
            sender.start()
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            sender.join(15)
        with station_process(*common) as (_proc, url):
            after = {t["name"]: t["version"] for t in StationClient(url).tasks()}
        assert after["digits"] in (before["digits"], target)
        outcomes.add(after["digits"] == target)
        files = sorted(p.name for p in state.rglob("*") if p.is_file())
        assert not [f for f in files if f.endswith(".tmp")], files
        assert len(files) <= 3  # station.json + the current and previous package, nothing orphaned
    shutil.rmtree(state)


def _ignore_errors(call):
    try:
        call()
    except Exception:  # the server was killed mid-request: that is the point
        pass


# --- the page in a real browser --------------------------------------------------------------------
@pytest.mark.skipif(chromium_path() is None, reason="no Chromium (apt-get install -y chromium, or PETAH_CHROMIUM)")
def test_page_shows_what_the_api_answers(demo_station, tmp_path):
    """Upload an image through the page; it shows the same top class, box count and class shares
    as the API. PETAH_STATION_SCREENSHOT=docs/img/station.png refreshes the docs' picture."""
    from playwright.sync_api import sync_playwright

    image_path = tmp_path / "part.png"
    image_path.write_bytes(digit_image(6, size=128))
    api = StationClient(demo_station["url"]).predict([("part.png", image_path.read_bytes())]).json()
    want = api["images"][0]["tasks"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-default-apps", "--disable-sync", "--no-first-run", "--metrics-recording-only"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(30_000)
            page.goto(demo_station["url"] + "/")
            page.wait_for_selector("#tasks tbody tr[data-task='digits']")
            assert page.locator("#tasks tbody tr").count() == len(want)
            page.set_input_files("#file", str(image_path))
            page.wait_for_function("document.querySelectorAll('#results .card').length === 5")
            digits = page.locator(".card[data-task='digits']")
            assert digits.get_attribute("data-top-label") == want["digits"]["label"]
            assert digits.get_attribute("data-version") == want["digits"]["version"]
            boxes = page.locator(".card[data-task='digit-boxes']").get_attribute("data-box-count")
            assert int(boxes) == len(want["digit-boxes"]["boxes"])
            shares = page.locator(".card[data-task='defects'] [data-class]")
            shown = {shares.nth(i).get_attribute("data-class"): float(shares.nth(i).get_attribute("data-share"))
                     for i in range(shares.count())}
            assert shown == want["defects"]["pixels"]
            anomaly = page.locator(".card[data-task='surfaces']")
            assert anomaly.get_attribute("data-anomalous") == str(want["surfaces"]["anomalous"]).lower()
            assert float(anomaly.get_attribute("data-score")) == want["surfaces"]["score"]
            assert anomaly.locator("canvas").count() == 1
            page.wait_for_function("document.getElementById('c-requests').textContent !== '–'")
            assert page.locator("#error").text_content() == ""
            shot = tmp_path / "station.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            target = os.environ.get("PETAH_STATION_SCREENSHOT")
            if target:
                shutil.copyfile(shot, target)
        finally:
            browser.close()


def test_a_task_fed_other_images_is_called_drifting_on_the_api_metrics_and_page(demo_station):
    """Dark frames (a light failed) sent to digits: the drift check calls it drifting on /v1/tasks,
    /metrics and the page (the station's other tests sent it noise too: no claim about the rest)."""
    client = StationClient(demo_station["url"])
    dark = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 4, np.uint8)).save(dark, format="PNG")
    for i in range(60):
        assert client.predict([(f"dark{i}.png", dark.getvalue())], ["digits"]).status == 200
    drift = {t["name"]: t["drift"] for t in client.tasks()}
    assert drift["digits"]["state"] == "drifting" and drift["digits"]["input_drift"] > 1.0, drift["digits"]
    assert drift["digits"]["alarms"] >= 1 and drift["digits"]["trend"]
    metrics = client.request("GET", "/metrics").body.decode()
    assert 'petah_task_drifting{task="digits"} 1.0' in metrics and 'petah_task_input_drift{task="digits"}' in metrics
    if chromium_path() is None:
        return
    with chromium_page() as page:
        page.goto(demo_station["url"] + "/")
        page.wait_for_selector("#tasks tbody tr[data-task='digits'] td[data-drift='drifting'] .badge")
        assert page.locator("tr[data-task='digits'] .badge").text_content() == "drifting"
        assert "input drift" in page.locator("tr[data-task='digits'] .badge").get_attribute("title")
        assert page.locator("tr[data-task='digits'] svg.trend").count() == 1


@pytest.mark.parametrize("options, needle", [
    (dict(host="0.0.0.0"), "--token-file"),
    (dict(max_batch=0), "--max-batch"),
    (dict(engine="tensorrt"), "--engine"),
    (dict(port=70000), "--port"),
    (dict(ssl_keyfile="key.pem"), "both --ssl-keyfile and --ssl-certfile"),
    (dict(admin_token_file="missing-token"), "no such file"),
])
def test_station_options_are_checked(options, needle):
    with pytest.raises(PetahError, match=re.escape(needle)):
        ServeConfig(**options)


def test_serve_refuses_bad_input_in_one_line_before_loading_anything(tmp_path):
    from conftest import petah_process

    (tmp_path / "short").write_text("abc")
    for args, needle in [
        (["--demo", "--host", "0.0.0.0"], "--token-file"),
        (["--demo", "--admin-token-file", str(tmp_path / "short")], "at least 16 characters"),
        (["--demo", "-p", str(tmp_path / "none.petah")], "package not found"),
    ]:
        proc = petah_process("serve", *args, "--state-dir", str(tmp_path / "s"), "--port", "0", ok=False)
        assert proc.returncode != 0 and needle in proc.stderr, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "s").exists()  # refused before the state dir was made


def test_worker_batches_skips_cancelled_requests_and_refuses_work_once_stopped():
    from petah.serve.worker import BatchWorker, Busy, Job

    batches = []

    def run_batch(jobs):
        batches.append(len(jobs))
        for job in jobs:
            if job.future.set_running_or_notify_cancel():
                job.future.set_result(job.count)

    worker = BatchWorker(run_batch, max_batch=8, max_wait_s=0.2, queue_size=2, in_flight=lambda: 3)
    first, gone, third = Job({}, (), 1), Job({}, (), 2), Job({}, (), 3)
    worker.submit(first)
    worker.submit(gone)
    with pytest.raises(Busy, match="queue is full"):
        worker.submit(third)
    gone.future.cancel()  # its client went away while it waited
    worker.start()
    assert first.future.result(5) == 1 and gone.future.cancelled() and batches == [2]
    worker.submit(third)
    assert third.future.result(5) == 3
    assert worker.call(lambda: "between batches").result(5) == "between batches"
    worker.stop()
    with pytest.raises(Busy, match="shutting down"):
        worker.call(lambda: None)
    with pytest.raises(Busy, match="shutting down"):
        worker.submit(Job({}, (), 1))
