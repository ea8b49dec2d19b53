"""The hub under hostile input and hard stops: deeply nested JSON gets a 400 (not a RecursionError's
500), and what a killed publish left in ``incoming/`` goes at the next start, nothing else; over a
real hub on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import closed_by_server, idle_and_slow_clients, sockets_allowed
from petah.errors import PetahError
from petah.fleet.client import _multipart, call, publish_release
from petah.fleet.hub import Hub, add_device
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository
from petah.http import MAX_JSON_DEPTH, json_too_deep
from petah.packages import generate_keypair
from petah.serve import demo_packages

pytestmark = pytest.mark.server

DIGITS = Path(next(p for p in demo_packages() if p.stem == "digits"))
DEEP = 30_000  # levels: 60 KB of brackets, under the 64 KB report limit
ARRAYS = b"[" * DEEP + b"]" * DEEP
OBJECTS = b'{"a":' * 10_000 + b"1" + b"}" * 10_000  # 10,000 levels in 60 KB


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name in ("root", "release"):
        generate_keypair(folder / name)
    return folder


def new_hub(tmp: Path, keys: Path) -> Path:
    init_repository(tmp / "hub", keys / "root.key", keys / "release.key")
    return tmp / "hub"


def test_json_depth_scan_respects_strings_and_escapes():
    assert not json_too_deep(b'{"a": [1, {"b": [[]]}]}', 5) and json_too_deep(b'{"a": [1, {"b": [[]]}]}', 4)
    assert not json_too_deep(b'["[[[[[[", "\\"[[[[", "\\\\"]', 1)  # brackets in strings, escaped quotes
    assert json_too_deep(b'["]]]]", [[[]]]]', 3)  # a closing bracket in a string closes nothing
    assert not json_too_deep(b"[1, 2", 1) and not json_too_deep(b"]]]][[[[[[", 3)  # not JSON: json.loads says so


def test_deeply_nested_json_gets_400_and_the_hub_answers_on(tmp_path, keys):
    root = new_hub(tmp_path, keys)
    add_device(root, "dev", tmp_path / "dev.token")
    device = {"Authorization": f"Bearer {(tmp_path / 'dev.token').read_text().strip()}",
              "Content-Type": "application/json"}
    with running_hub(Hub(root)) as (url, _server):
        request = urllib.request.Request(f"{url}/v1/devices/dev/report", data=ARRAYS, method="POST", headers=device)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert caught.value.code == 400 and caught.value.headers["content-type"] == "application/json"
        assert json.loads(caught.value.read()) == {
            "error": f"the report body nests deeper than {MAX_JSON_DEPTH} levels"}
        settings = _multipart({"package": b"junk", "targets": b"{}", "settings": ARRAYS})
        targets = _multipart({"package": b"junk", "targets": b'{"a":' * DEEP + b"1" + b"}" * DEEP, "settings": b"{}"})
        cases = [
            ("/v1/devices/dev/poll", OBJECTS, device, "the poll body nests deeper"),
            ("/v1/releases", settings[0], {"Content-Type": settings[1]}, "settings nests deeper"),
            ("/v1/releases", targets[0], {"Content-Type": targets[1]},
             r"the uploaded targets metadata: not TUF metadata \(nests deeper"),
        ]
        for path, body, headers, needle in cases:
            with pytest.raises(PetahError, match=f"HTTP 400: {needle}"):
                call(f"{url}{path}", "POST", body, headers)
        # brackets inside a string are not nesting: answered as usual
        bracketed = b'{"state": "' + b"[" * DEEP + b'"}'
        assert "desired" in json.loads(call(f"{url}/v1/devices/dev/poll", "POST", bracketed, device))
        assert json.loads(call(f"{url}/healthz")) == {"status": "ok"}
        report = call(f"{url}/v1/devices/dev/report", "POST", b'{"event": "installed"}', device)
        assert json.loads(report) == {"ok": True}


def _staging_child(root: Path, payload: bytes, target: Path | None) -> tuple[int, Path, int]:
    """A forked process that stages ``payload`` as a publish does (``Repository.staged``) and holds
    it: its pid, the temp file, and a pipe; a byte on the pipe makes it rename the file to
    ``target`` and exit (a publish that completes)."""
    from petah.fleet.metadata import Repository

    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            with Repository(root).staged(payload) as staged:
                os.write(ready_w, str(staged).encode())
                os.read(go_r, 1)
                os.replace(staged, target)
            status = 0
        finally:
            os._exit(status)
    os.close(ready_w)
    staged = Path(os.read(ready_r, 4096).decode())
    os.close(ready_r)
    return pid, staged, go_w


def test_start_sweeps_what_a_killed_publish_left_and_nothing_else(tmp_path, keys):
    root = new_hub(tmp_path, keys)
    incoming = root / "incoming"
    outside = tmp_path / "outside.petah"
    outside.write_bytes(b"not the hub's")
    killed_pid, leftover, _ = _staging_child(root, b"\0" * 512 * 1024, None)
    os.kill(killed_pid, signal.SIGKILL)  # as kill -9 mid-publish: the lock goes with the process
    assert os.waitpid(killed_pid, 0)[1] != 0 and leftover.is_file() and leftover.parent == incoming
    landed = root / "landed.bin"
    live_pid, live, go = _staging_child(root, b"live", landed)  # another process publishing right now
    foreign = [root / "notes.txt", incoming / "notes.txt", incoming / "petah-0123.tmp",
               incoming / f"petah-{'ab' * 8}.tmp.bak"]
    for path in foreign:
        path.write_text("the user's")
    (incoming / f"petah-{'cd' * 8}.tmp").symlink_to(outside)  # petah's name, but a symlink out of the root
    (incoming / f"petah-{'ef' * 8}.tmp").mkdir()  # petah's name, but a folder
    (incoming / f"petah-{'ef' * 8}.tmp" / "kept").write_text("the user's")

    started = time.perf_counter()
    hub = Hub(root)  # the next start
    assert time.perf_counter() - started < 5
    assert not leftover.exists() and live.is_file()
    assert all(p.read_text() == "the user's" for p in foreign) and outside.read_bytes() == b"not the hub's"
    assert (incoming / f"petah-{'cd' * 8}.tmp").is_symlink() and (incoming / f"petah-{'ef' * 8}.tmp" / "kept").exists()
    os.write(go, b"x")  # the live publish completes as if no start had happened
    assert os.waitpid(live_pid, 0)[1] == 0 and landed.read_bytes() == b"live" and not live.exists()

    with running_hub(hub) as (url, _server):
        result = publish_release(DIGITS, url, keys / "release.key")
        assert (root / "targets" / "digits").is_dir() and result["target"].startswith("digits/")
        assert json.loads(call(f"{url}/healthz")) == {"status": "ok"}
    names = sorted(p.name for p in incoming.iterdir())
    assert names == sorted([p.name for p in foreign[1:]] + [f"petah-{'cd' * 8}.tmp", f"petah-{'ef' * 8}.tmp",
                                                              "hub.lock"])  # the root's lock file (kept, empty)
    os.close(go)


def test_a_symlinked_incoming_folder_is_refused_not_followed(tmp_path, keys):
    root = new_hub(tmp_path, keys)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"petah-{'01' * 8}.tmp").write_text("not the hub's")
    (root / "incoming").symlink_to(elsewhere)
    with pytest.raises(PetahError, match="incoming/ is a symlink or a file"):
        Hub(root)
    assert (elsewhere / f"petah-{'01' * 8}.tmp").read_text() == "not the hub's"


def test_a_thousand_idle_sockets_and_slowloris_do_not_lock_devices_out(tmp_path, keys):
    root = new_hub(tmp_path, keys)
    add_device(root, "dev", tmp_path / "dev.token")
    device = {"Authorization": f"Bearer {(tmp_path / 'dev.token').read_text().strip()}",
              "Content-Type": "application/json"}
    with sockets_allowed(1200), running_hub(Hub(root), header_timeout_s=2, max_connections=600) as (url, _server):
        idle, slow = idle_and_slow_clients(url, 1000, 30, path="/v1/devices/dev/poll")
        try:
            for _ in range(3):
                started = time.perf_counter()
                assert json.loads(call(f"{url}/healthz", timeout=5)) == {"status": "ok"}
                assert "desired" in json.loads(call(f"{url}/v1/devices/dev/poll", "POST", b"{}", device, timeout=5))
                assert time.perf_counter() - started < 1.0
                for sock in slow:
                    sock.sendall(b"X-Trickle: 1\r\n")
                time.sleep(0.5)
            assert closed_by_server(idle[0], 1)  # evicted at the cap
            assert all(closed_by_server(sock, 3) for sock in slow + idle[-5:])  # past the header deadline
        finally:
            for sock in idle + slow:
                sock.close()
