"""The line's inputs and outputs against real parts on 127.0.0.1: a watched folder written the way
a camera does, a real MQTT broker (Debian's mosquitto) stopped mid-run and started again, an HTTP
hook, a video file and an MJPEG camera stream served by FFmpeg (Debian's ffmpeg) decoded faster
than the model answers. Each station is a real process on the device engine; everything is bounded."""

import getpass
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image

from conftest import chromium_page, chromium_path
from petah.bench.fleet import wait_for
from petah.errors import PetahError
from petah.serve.client import StationClient, station_process
from petah.serve.sinks import SinkSpec
from petah.serve.sources import SourceSpec

pytestmark = pytest.mark.server
STATION = ("--demo", "--engine", "device", "--threads", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png(seed: int, size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def line_status(url: str) -> dict:
    client = StationClient(url)
    return {"sources": {s["name"]: s for s in client.request("GET", "/v1/sources").json()["sources"]},
            "sinks": {s["name"]: s for s in client.request("GET", "/v1/sinks").json()["sinks"]}}


@pytest.mark.parametrize("text, error", [
    ("cam", "write NAME=URI"),
    ("../x=folder:/tmp", "write NAME=URI"),
    ("cam=gopher://host/x", "gopher:// is not a stream"),
    ("cam=/no/such/thing", "neither a folder, a video file nor a stream URL"),
    ("cam=rtsp://h/x,fps=0", "fps must be a number in (0, 240]"),
    ("cam=rtsp://h/x,colour=red", "unknown option 'colour=red'"),
])
def test_a_bad_source_is_one_line(text, error):
    with pytest.raises(PetahError, match=error.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        SourceSpec.parse(text)


@pytest.mark.parametrize("text, error", [
    ("ftp://host/x", "the scheme must be one of"),
    ("mqtt://broker", "name the topic"),
    ("mqtt:///topic", "names no host"),
    ("jsonl:", "names no file"),
    ("http://h/x,min-score=high", "min-score must be a number"),
    ("http://h/x,colour=red", "unknown option"),
])
def test_a_bad_sink_is_one_line(text, error):
    with pytest.raises(PetahError, match=error):
        SinkSpec.parse(text)


def test_sink_rules_send_only_what_matters():
    spec = SinkSpec.parse("jsonl:out.jsonl,when=defects:scratch|dent,when=digit-boxes,min-score=0.5")
    record = {"task": "defects", "answer": {"label": "scratch", "score": 0.9}}
    assert spec.select(record) == record
    assert spec.select({"task": "defects", "answer": {"label": "good", "score": 0.9}}) is None
    assert spec.select({"task": "defects", "answer": {"label": "dent", "score": 0.4}}) is None  # under min-score
    assert spec.select({"task": "digits", "answer": {"label": "3", "score": 0.9}}) is None  # not a named task
    boxes = {"task": "digit-boxes", "answer": {"boxes": [{"label": "1", "score": 0.7}, {"label": "2", "score": 0.2}]}}
    assert spec.select(boxes)["answer"]["boxes"] == [{"label": "1", "score": 0.7}]
    assert SinkSpec.parse("mqtt://u:secret@h/t").shown_uri == "mqtt://u:***@h/t"


class Hook(BaseHTTPRequestHandler):
    received: list

    def do_POST(self):  # noqa: N802 - http.server's name
        self.received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def hook():
    received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("H", (Hook,), {"received": received}))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/results", received
    server.shutdown()
    server.server_close()


def write_like_a_camera(folder, name: str, data: bytes, pause: float = 0.0) -> None:
    """In two parts with a pause between (the file is visible half-written), or by a rename."""
    if pause:
        with open(folder / name, "wb") as handle:
            handle.write(data[: len(data) // 2])
            handle.flush()
            time.sleep(pause)
            handle.write(data[len(data) // 2:])
    else:
        (folder / f".{name}.part").write_bytes(data)
        os.rename(folder / f".{name}.part", folder / name)


def test_a_watched_folder_answers_each_complete_file_once(tmp_path, hook):
    url_hook, received = hook
    moved, kept = tmp_path / "camera", tmp_path / "shared"
    moved.mkdir()
    kept.mkdir()
    (moved / "notes.txt").write_text("not an image")
    (moved / "upload.png.tmp").write_bytes(png(9))  # a temp name: never touched
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source", f"cam=folder:{moved},tasks=digits",
            "--source", f"share={kept},tasks=digits,after=leave", "--sink", f"jsonl:{tmp_path / 'out.jsonl'}",
            "--sink", url_hook)
    with station_process(*args) as (_proc, url):
        threads = [threading.Thread(target=write_like_a_camera, args=(moved, f"part-{i}.png", png(i), 0.3))
                   for i in range(3)]
        for thread in threads:
            thread.start()
        write_like_a_camera(moved, "renamed.png", png(5))
        (moved / "broken.png").write_bytes(b"\x89PNG but not really")
        (kept / "a.png").write_bytes(png(6))
        for thread in threads:
            thread.join()
        assert wait_for(lambda: len(list((moved / "done").glob("*.png"))) == 4 and (moved / "failed").exists()
                        and line_status(url)["sources"]["share"]["answered"] == 1, 30)
        status = line_status(url)
        assert status["sources"]["cam"]["failed"] == 1 and "broken.png" in status["sources"]["cam"]["error"]
        assert wait_for(lambda: len(received) == 5, 10)
    assert (moved / "failed" / "broken.png.error.txt").read_text().startswith("cannot read image broken.png")
    assert (moved / "notes.txt").exists() and (moved / "upload.png.tmp").exists()
    lines = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(r["frame"] for r in lines) == ["a.png", "part-0.png", "part-1.png", "part-2.png", "renamed.png"]
    assert {r["task"] for r in lines} == {"digits"} and all(r["answer"]["label"] for r in lines)
    assert sorted(r["frame"] for r in received) == sorted(r["frame"] for r in lines)  # the hook got the same
    # a restart answers nothing again: moved files are gone from the folder, a left one is in the journal
    with station_process(*args) as (_proc, url):
        time.sleep(2.0)
        assert line_status(url)["sources"]["share"]["answered"] == 0
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 5


MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """Debian's mosquitto on a free port, with a password file and persistence (a restart keeps
    what it owed a subscriber's session)."""

    def __init__(self, folder):
        if not os.path.exists(MOSQUITTO):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.folder, self.port = folder, free_port()
        folder.mkdir(exist_ok=True)
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwords"), "line", "s3cret"], check=True,
                       capture_output=True)
        (folder / "mosquitto.conf").write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {folder / 'passwords'}\n"
            f"persistence true\npersistence_location {folder}/\n"
            f"user {getpass.getuser()}\n")  # as root it would switch to a user who cannot read the test's folder
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.folder / "mosquitto.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert wait_for(self._listening, 10), "mosquitto did not start"

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def broker(tmp_path):
    broker = Broker(tmp_path / "broker")
    broker.start()
    yield broker
    broker.stop()


def subscriber(port: int, topic: str, received: list):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="plc", clean_session=False)
    client.username_pw_set("line", "s3cret")
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = lambda _c, _u, message: received.append((message.topic, json.loads(message.payload)))
    client.reconnect_delay_set(0.2, 1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def test_mqtt_results_survive_a_broker_outage(tmp_path, broker):
    folder = tmp_path / "camera"
    folder.mkdir()
    received = []
    plc = subscriber(broker.port, "line-1/#", received)
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source", f"cam=folder:{folder},tasks=digits",
            "--sink", f"mqtt://line:s3cret@127.0.0.1:{broker.port}/line-1",
            "--sink", f"mqtt://line:wrong@127.0.0.1:{broker.port}/line-2,name=refused")
    try:
        with station_process(*args) as (_proc, url):
            for i in range(3):
                write_like_a_camera(folder, f"{i}.png", png(i))
            assert wait_for(lambda: len(received) >= 3, 30), received
            assert received[0][0] == "line-1/cam/digits"
            refused = line_status(url)["sinks"]["refused"]
            assert refused["state"] == "retrying" and "not connected" in refused["error"], refused
            broker.stop()  # the broker goes away mid-run: results queue on the station's disk
            for i in range(3, 6):
                write_like_a_camera(folder, f"{i}.png", png(i))
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["answered"] == 6, 30)
            sink = line_status(url)["sinks"]["mqtt-0"]
            assert sink["backlog_bytes"] > 0 and sink["state"] == "retrying", sink
            broker.start()
            assert wait_for(lambda: {r["frame"] for _t, r in received} == {f"{i}.png" for i in range(6)}, 60), received
            assert wait_for(lambda: line_status(url)["sinks"]["mqtt-0"]["backlog_bytes"] == 0, 10)
            health = StationClient(url).request("GET", "/healthz")
            assert health.status == 200  # a refused sink never stops the station
    finally:
        plc.loop_stop()
        plc.disconnect()


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """Two seconds of H.264 at 64x64 and 100 fps (a source faster than the model)."""
    if shutil.which("ffmpeg") is None:
        pytest.fail("ffmpeg is not installed (apt-get install ffmpeg; .ci/run does)")
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "testsrc=size=64x64:rate=100",
                    "-t", "2", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    return path


def test_a_stream_faster_than_the_model_is_answered_on_its_newest_frames(tmp_path, clip):
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source", f"video={clip},loop",
            "--sink", f"jsonl:{tmp_path / 'out.jsonl'}")
    with station_process(*args) as (_proc, url):
        assert wait_for(lambda: line_status(url)["sources"]["video"]["taken"] >= 40, 30)
        video = line_status(url)["sources"]["video"]
    assert video["state"] == "streaming" and video["size"] == [64, 64]
    assert video["dropped"] > 0 and video["decoded"] >= video["taken"] + video["dropped"] - 1  # stale frames skipped
    # an answer is never older than about one inference (5 tasks, ~20-40 ms here) and one frame interval
    # (10 ms): a backlog of the 100 fps source would make it seconds
    assert video["latency_ms"]["p99"] < 250, video
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert {r["task"] for r in records} == {"digits", "textures", "defects", "digit-boxes", "surfaces"}
    frames = [r["frame"] for r in records if r["task"] == "digits"]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # newest first, never one twice


def test_an_ip_camera_is_followed_through_a_disconnect(tmp_path, clip):
    """An MJPEG-over-HTTP camera (FFmpeg serving one), cut off and back."""
    port = free_port()
    serve = ["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip), "-c:v", "mjpeg",
             "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/cam.mjpg"]
    camera = subprocess.Popen(serve)
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source",
            f"cam=http://127.0.0.1:{port}/cam.mjpg,tasks=digits,fps=10", "--source", "gone=rtsp://127.0.0.1:9/none")
    try:
        with station_process(*args) as (_proc, url):
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["taken"] >= 5, 30), line_status(url)
            camera.kill()
            camera.wait()
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["state"] == "reconnecting", 20)
            gone = line_status(url)["sources"]["gone"]
            assert gone["state"] == "reconnecting" and gone["error"], gone
            camera = subprocess.Popen(serve)  # the camera comes back: the source follows by itself
            before = line_status(url)["sources"]["cam"]["taken"]
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["taken"] > before + 3, 40), line_status(url)
            assert line_status(url)["sources"]["cam"]["reconnects"] >= 1
            metrics = StationClient(url).request("GET", "/metrics").body.decode()
            assert 'petah_source_up{source="cam"} 1.0' in metrics and 'petah_source_up{source="gone"} 0.0' in metrics
    finally:
        camera.kill()
        camera.wait()


@pytest.mark.browser
def test_the_page_shows_each_source_with_its_newest_answer(tmp_path):
    if chromium_path() is None:
        pytest.skip("no Chromium (apt-get install -y chromium, or PETAH_CHROMIUM)")
    folder = tmp_path / "camera"
    folder.mkdir()
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source",
            f"cam=folder:{folder},tasks=digits+digit-boxes", "--sink", f"jsonl:{tmp_path / 'out.jsonl'}")
    with station_process(*args) as (_proc, url):
        write_like_a_camera(folder, "part.png", png(3, size=96))
        assert wait_for(lambda: (tmp_path / "out.jsonl").exists()
                        and len((tmp_path / "out.jsonl").read_text().splitlines()) == 2, 30)
        said = {r["task"]: r["answer"] for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
        with chromium_page() as page:
            page.goto(url + "/")
            answers = page.locator("[data-source='cam'] [data-frame='part.png']")
            answers.wait_for()
            text = answers.text_content()
            assert f"digits: {said['digits']['label']} " in text
            assert f"digit-boxes: {len(said['digit-boxes']['boxes'])} box(es)" in text
            size = page.evaluate("(() => { const c = document.querySelector(\"[data-source='cam'] canvas\");"
                                 " return [c.width, c.height]; })()")
            assert size == [96, 96]
            assert page.locator("#sinks tr[data-sink='jsonl-0']").get_attribute("data-state") in ("idle", "delivering")


def test_a_source_added_through_the_api_is_kept_across_restarts(tmp_path):
    (tmp_path / "admin").write_text("line-admin-token-0123456789abcdef")
    folder = tmp_path / "camera"
    folder.mkdir()
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--admin-token-file", str(tmp_path / "admin"))
    body = json.dumps({"uri": f"folder:{folder}", "tasks": ["digits"], "after": "leave"}).encode()
    with station_process(*args) as (_proc, url):
        client = StationClient(url)
        refused = client.request("PUT", "/v1/sources/cam", body, token="wrong-token-0123456789abcdef")
        assert refused.status == 401
        bad = client.request("PUT", "/v1/sources/cam", json.dumps({"uri": "gopher://x/y"}).encode(),
                             token="line-admin-token-0123456789abcdef")
        assert bad.status == 400 and "gopher:// is not a stream" in bad.json()["error"]
        made = client.request("PUT", "/v1/sources/cam", body, token="line-admin-token-0123456789abcdef")
        assert made.status == 200 and made.json()["source"]["state"] == "watching"
        (folder / "a.png").write_bytes(png(1))
        assert wait_for(lambda: line_status(url)["sources"]["cam"]["answered"] == 1, 20)
    with station_process(*args) as (_proc, url):
        assert line_status(url)["sources"]["cam"]["kind"] == "folder"  # kept in the state dir
        (folder / "b.png").write_bytes(png(2))
        assert wait_for(lambda: line_status(url)["sources"]["cam"]["answered"] == 1, 20)  # b only: a is journaled
        client = StationClient(url)
        assert client.request("DELETE", "/v1/sources/cam", token="line-admin-token-0123456789abcdef").status == 200
        assert "cam" not in line_status(url)["sources"]
    assert json.loads((tmp_path / "state" / "line.json").read_text()) == {"sources": {}}
