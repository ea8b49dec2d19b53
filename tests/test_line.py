"""The line's inputs and outputs against real parts on 127.0.0.1: a watched folder written the way
a camera does, a real MQTT broker (Debian's mosquitto, with TLS from a private CA) stopped mid-run
and started again, an HTTP hook, a video file and an MJPEG camera stream served by FFmpeg, an RTSP
camera served by GStreamer's RTSP server (cut off and back), decoded faster than the model answers,
triggered by MQTT messages and HTTP calls and answered by regions. Each station is a real process
on the device engine; everything is bounded."""

import getpass
import io
import json
import os
import re
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

from conftest import chromium_page, chromium_path, free_port
from petah.bench.fleet import wait_for
from petah.errors import PetahError
from petah.serve.client import StationClient, station_process
from petah.serve.line import trigger_id
from petah.serve.sinks import SinkSpec
from petah.serve.sources import Region, SourceSpec

pytestmark = pytest.mark.server
STATION = ("--demo", "--engine", "device", "--threads", "1")


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
    ("cam=rtsp://h/x,width=big", "width must be a whole number of pixels in [16, 8192]"),
    ("cam=rtsp://u:pw@cam:abc/x", "the port of 'rtsp://u:***@cam:abc/x' is not a number"),
    ("cam=folder:/tmp,width=320", "a folder's files are taken whole"),
    ("cam=rtsp://h/x,region=left:0:0:10", "write region=NAME:X:Y:W:H"),
    ("cam=rtsp://h/x,region=left:0:0:10:ten", "write region=NAME:X:Y:W:H"),
    ("cam=rtsp://h/x,region=left:0:0:0:10", "must lie in the frame with a positive size"),
    ("cam=rtsp://h/x,region=a:0:0:1:1,region=a:1:1:1:1", "two regions have one name"),
    ("cam=folder:/tmp,trigger", "triggers are for streams"),
    ("cam=rtsp://h/x,trigger=mqtt://u:pw@broker", "'mqtt://u:***@broker': name the topic"),
    ("cam=rtsp://h/x,trigger=mqtt://broker:port/t", "the port is not a number"),
    ("cam=rtsp://h/x,trigger=ftp://h/t", "unknown option 'trigger=ftp://h/t'"),
])
def test_a_bad_source_is_one_line(text, error):
    with pytest.raises(PetahError, match=re.escape(error)):
        SourceSpec.parse(text)


def test_regions_and_triggers_are_read_as_written():
    spec = SourceSpec.parse("cam=rtsp://h/x,trigger=mqtt://b/line/go,region=left:0:0:32:64:digits+defects,"
                            "region=right:32:0:32:64")
    assert spec.regions == (Region("left", (0, 0, 32, 64), ("digits", "defects")), Region("right", (32, 0, 32, 64)))
    assert SourceSpec.from_dict("cam", spec.to_dict()) == spec  # as the admin API keeps it
    image = np.random.default_rng(0).integers(0, 256, (3, 64, 64), np.uint8)
    assert np.array_equal(spec.regions[1].crop(image), image[:, :, 32:])
    with pytest.raises(PetahError, match=re.escape("region left (0,0 32x64) is outside the 64x48 frame")):
        spec.regions[0].crop(image[:, :48])
    with pytest.raises(PetahError, match="regions must be a list of"):
        SourceSpec.from_dict("cam", {"uri": "rtsp://h/x", "regions": [{"name": "a", "box": [0, 0, 1]}]})
    assert [trigger_id(p) for p in (b'{"id": "part-7"}', b"part-8", b"", b'{"id": 9}', b"x" * 500)] == \
        ["part-7", "part-8", None, "9", "x" * 128]


@pytest.mark.parametrize("text, error", [
    ("ftp://host/x", "the scheme must be one of"),
    ("mqtt://broker", "name the topic"),
    ("mqtt:///topic", "names no host"),
    ("mqtt://u:pw@h", "'mqtt://u:***@h': name the topic"),
    ("jsonl:", "names no file"),
    ("http://h/x,min-score=high", "min-score must be a number"),
    ("http://h/x,colour=red", "unknown option"),
])
def test_a_bad_sink_is_one_line(text, error):
    with pytest.raises(PetahError, match=re.escape(error)):
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


def private_ca(folder) -> tuple:
    """A CA of the line's own and a certificate it signed for 127.0.0.1: (ca, certificate, key) files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject, key, issuer, issuer_key, ca: bool):
        made = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            made = made.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                      critical=False)
        return made.sign(issuer_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    files = folder / "ca.pem", folder / "broker.pem", folder / "broker.key"
    pem = serialization.Encoding.PEM
    files[0].write_bytes(certificate("line CA", ca_key, "line CA", ca_key, True).public_bytes(pem))
    files[1].write_bytes(certificate("broker", key, "line CA", ca_key, False).public_bytes(pem))
    files[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return files


class Broker:
    """Debian's mosquitto on a free port, with a password file and persistence (a restart keeps
    what it owed a subscriber's session); with ``tls``, a second listener whose certificate a
    private CA signed (``self.ca``)."""

    def __init__(self, folder, tls: bool = False):
        if not os.path.exists(MOSQUITTO):
            pytest.fail("mosquitto is not installed (apt-get install mosquitto; .ci/run does)")
        self.folder, self.port = folder, free_port()
        folder.mkdir(exist_ok=True)
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(folder / "passwords"), "line", "s3cret"], check=True,
                       capture_output=True)
        conf = (f"listener {self.port} 127.0.0.1\nallow_anonymous false\npassword_file {folder / 'passwords'}\n"
                f"persistence true\npersistence_location {folder}/\n"
                f"user {getpass.getuser()}\n")  # as root it would switch to a user who cannot read the test's folder
        self.tls_port = self.ca = None
        if tls:
            self.tls_port = free_port()
            self.ca, cert, key = private_ca(folder)
            conf += f"listener {self.tls_port} 127.0.0.1\ncafile {self.ca}\ncertfile {cert}\nkeyfile {key}\n"
        (folder / "mosquitto.conf").write_text(conf)
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


def subscriber(port: int, topic: str, received: list, client_id: str = "plc"):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
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
            "--source", f"small={clip},loop,width=32,tasks=digits", "--sink", f"jsonl:{tmp_path / 'out.jsonl'}")
    with station_process(*args) as (_proc, url):
        assert wait_for(lambda: line_status(url)["sources"]["video"]["taken"] >= 40, 30)
        video = line_status(url)["sources"]["video"]
        assert line_status(url)["sources"]["small"]["size"] == [32, 32]  # scaled by the decoder
    assert video["state"] == "streaming" and video["size"] == [64, 64]
    assert video["dropped"] > 0 and video["decoded"] >= video["taken"] + video["dropped"] - 1  # stale frames skipped
    # an answer is never older than about one inference (5 tasks, ~20-40 ms here) and one frame interval
    # (10 ms): a backlog of the 100 fps source would make it seconds
    assert video["latency_ms"]["p99"] < 250, video
    records = [r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines()) if r["source"] == "video"]
    assert {r["task"] for r in records} == {"digits", "textures", "defects", "digit-boxes", "surfaces"}
    frames = [r["frame"] for r in records if r["task"] == "digits"]
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # newest first, never one twice


def test_an_mjpeg_camera_is_answered_and_an_unreachable_one_named(tmp_path, clip):
    """An MJPEG-over-HTTP camera (FFmpeg serving one) beside a stream that is not there."""
    port = free_port()
    camera = subprocess.Popen(["ffmpeg", "-nostdin", "-loglevel", "error", "-re", "-stream_loop", "-1", "-i", str(clip),
                               "-c:v", "mjpeg", "-f", "mpjpeg", "-listen", "1", f"http://127.0.0.1:{port}/cam.mjpg"])
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source",
            f"cam=http://127.0.0.1:{port}/cam.mjpg,tasks=digits,fps=10", "--source", "gone=rtsp://127.0.0.1:9/none")
    try:
        with station_process(*args) as (_proc, url):
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["taken"] >= 5, 30), line_status(url)
            gone = line_status(url)["sources"]["gone"]
            assert gone["state"] == "reconnecting" and gone["error"], gone
            metrics = StationClient(url).request("GET", "/metrics").body.decode()
            assert 'petah_source_up{source="cam"} 1.0' in metrics and 'petah_source_up{source="gone"} 0.0' in metrics
    finally:
        camera.kill()
        camera.wait()


class RtspCamera:
    """GStreamer's RTSP server (tests/rtsp_camera.py, run by the system's python3) on a free port."""

    def __init__(self):
        self.port, self.proc = free_port(), None
        self.url = f"rtsp://127.0.0.1:{self.port}/cam"

    def start(self):
        self.proc = subprocess.Popen(["/usr/bin/python3", os.path.join(os.path.dirname(__file__), "rtsp_camera.py"),
                                      str(self.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.stop()
            pytest.fail("GStreamer's RTSP server did not start (apt-get install python3-gi gir1.2-gst-rtsp-server-1.0 "
                        f"gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly; .ci/run "
                        f"does): {self.proc.stderr.read()[-500:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()


def test_a_triggered_rtsp_camera_answers_its_regions_once_per_trigger(tmp_path):
    """An IP camera's RTSP stream, driven by the line's controller: an MQTT message or an HTTP call
    per part, each answered on a frame decoded after it, by regions with their own tasks; results go
    out through a broker checked against the line's private CA; the camera cut off and back."""
    camera, broker = RtspCamera(), Broker(tmp_path / "broker", tls=True)
    camera.start()
    broker.start()
    received = []
    plc = subscriber(broker.port, "line-1/results/#", received)
    drop = tmp_path / "drop"
    drop.mkdir()
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--mqtt-ca", str(broker.ca),
            "--source", f"cam={camera.url},trigger=mqtt://line:s3cret@127.0.0.1:{broker.port}/line-1/part,"
                        "region=left:0:0:32:64:digits,region=right:32:0:32:64:textures+defects",
            "--source", f"drop=folder:{drop}",
            "--sink", f"mqtts://line:s3cret@127.0.0.1:{broker.tls_port}/line-1/results")
    try:
        with station_process(*args) as (_proc, url):
            client = StationClient(url)
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["state"] == "streaming"
                            and line_status(url)["sources"]["cam"]["trigger"]["connected"], 30), line_status(url)
            sent = time.time()
            plc.publish("line-1/part", json.dumps({"id": "part-1"}), qos=1)
            assert wait_for(lambda: len(received) >= 3, 30), received
            records = {(r["region"], r["task"]): r for _topic, r in received}
            assert set(records) == {("left", "digits"), ("right", "textures"), ("right", "defects")}
            assert {r["trigger"] for r in records.values()} == {"part-1"}
            assert len({r["frame"] for r in records.values()}) == 1
            assert records["left", "digits"]["frame_time"] >= sent - 0.01  # decoded after the trigger
            assert {t for t, _r in received} == {"line-1/results/cam/left/digits", "line-1/results/cam/right/textures",
                                                 "line-1/results/cam/right/defects"}
            answer = client.request("POST", "/v1/sources/cam/trigger", json.dumps({"id": "part-2"}).encode())
            assert answer.status == 200, answer.body
            assert {(r["region"], r["task"], r["trigger"]) for r in answer.json()["results"]} == {
                ("left", "digits", "part-2"), ("right", "textures", "part-2"), ("right", "defects", "part-2")}
            assert wait_for(lambda: len(received) == 6, 20), received
            cam = line_status(url)["sources"]["cam"]
            assert cam["taken"] == 2 and cam["trigger"]["triggers"] == 2 and cam["dropped"] == 0, cam  # no free run
            latest = client.request("GET", "/v1/sources/cam/latest").json()
            assert [(r["name"], r["box"]) for r in latest["regions"]] == [("left", [0, 0, 32, 64]),
                                                                          ("right", [32, 0, 32, 64])]
            refused = client.request("POST", "/v1/sources/drop/trigger")
            assert refused.status == 409 and "runs freely" in refused.json()["error"]
            camera.stop()  # the camera goes away: a trigger gets a clear error, the source reconnects
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["state"] == "reconnecting", 20)
            missed = client.request("POST", "/v1/sources/cam/trigger", b'{"id": "part-3"}')
            assert missed.status == 503 and "no frame arrived within 5 s" in missed.json()["error"], missed.body
            camera.start()
            assert wait_for(lambda: line_status(url)["sources"]["cam"]["state"] == "streaming", 40), line_status(url)
            again = client.request("POST", "/v1/sources/cam/trigger", b'{"id": "part-4"}')
            assert again.status == 200 and {r["trigger"] for r in again.json()["results"]} == {"part-4"}
            assert line_status(url)["sources"]["cam"]["reconnects"] >= 1
            sink = line_status(url)["sinks"]["mqtts-0"]
            assert wait_for(lambda: line_status(url)["sinks"]["mqtts-0"]["delivered"] == 9, 20), sink
    finally:
        plc.loop_stop()
        plc.disconnect()
        camera.stop()
        broker.stop()


@pytest.mark.browser
def test_the_page_shows_each_source_with_its_newest_answer(tmp_path):
    if chromium_path() is None:
        pytest.skip("no Chromium (apt-get install -y chromium, or PETAH_CHROMIUM)")
    whole, parts = tmp_path / "camera", tmp_path / "fixture"
    whole.mkdir()
    parts.mkdir()
    out = tmp_path / "out.jsonl"
    args = (*STATION, "--state-dir", str(tmp_path / "state"), "--source",
            f"cam=folder:{whole},tasks=digits+digit-boxes", "--source",
            f"fixture=folder:{parts},region=top:0:0:96:48:digits,region=bottom:0:48:96:48:digit-boxes",
            "--sink", f"jsonl:{out}")
    with station_process(*args) as (_proc, url):
        write_like_a_camera(whole, "part.png", png(3, size=96))
        write_like_a_camera(parts, "two.png", png(4, size=96))
        assert wait_for(lambda: out.exists() and len(out.read_text().splitlines()) == 4, 30)
        said = {(r["source"], r["task"]): r["answer"] for r in map(json.loads, out.read_text().splitlines())}
        with chromium_page() as page:
            page.goto(url + "/")
            answers = page.locator("[data-source='cam'] [data-frame='part.png']")
            answers.wait_for()
            text = answers.text_content()
            assert f"digits: {said['cam', 'digits']['label']} " in text
            assert f"digit-boxes: {len(said['cam', 'digit-boxes']['boxes'])} box(es)" in text
            size = page.evaluate("(() => { const c = document.querySelector(\"[data-source='cam'] canvas\");"
                                 " return [c.width, c.height]; })()")
            assert size == [96, 96]
            regions = page.locator("[data-source='fixture'] [data-frame='two.png']")
            regions.wait_for()
            text = regions.text_content()
            assert f"[top] digits: {said['fixture', 'digits']['label']} " in text
            assert f"[bottom] digit-boxes: {len(said['fixture', 'digit-boxes']['boxes'])} box(es)" in text
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
