"""The station under hostile or careless use: a state dir it shares with a person's files, idle and
slow sockets, a read-only or full disk, errors that must not leak server paths. Real processes on
127.0.0.1, bounded in count and time."""

import contextlib
import hashlib
import io
import os
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from conftest import closed_by_server, idle_and_slow_clients, petah_process, sockets_allowed
from petah.backbones import create_backbone, demo_backbone_path
from petah.errors import PetahError, PetahWarning
from petah.packages import encode_package, generate_keypair, read_package
from petah.plans import PlanConfig
from petah.serve import ServeConfig, Station, demo_packages
from petah.serve.client import StationClient, station_process
from petah.serve.state import StateDir
from petah.testing import synthetic_package

pytestmark = pytest.mark.server

ADMIN = "admin-token-for-tests-0123456789"
API = "api-token-for-tests-0123456789"
DIGITS = next(p for p in demo_packages() if p.stem == "digits")
TEXTURES = next(p for p in demo_packages() if p.stem == "textures")
FINGERPRINT = "f" * 64


def sha_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokens")
    (root / "admin").write_text(ADMIN + "\n")
    (root / "api").write_text(API + "\n")
    return root


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(weights=str(demo_backbone_path()))


# --- the state dir holds only what petah wrote ------------------------------------------------------
def test_start_removes_only_what_petah_provably_wrote(tmp_path):
    packages = tmp_path / "packages"
    packages.mkdir()
    digits, textures = DIGITS.read_bytes(), TEXTURES.read_bytes()
    theirs = {"inspection.petah": digits, "notes.txt": b"line 3 camera moved", f"{'1' * 64}.petah": b"not its hash",
              f"{sha_of(textures)}.petah.bak": textures, ".station.json.backup.tmp": b"theirs"}
    for name, data in theirs.items():
        (packages / name).write_bytes(data)
    (packages / "sub").mkdir()
    (packages / "sub" / f"{sha_of(digits)}.petah").write_bytes(digits)
    state = StateDir(tmp_path, FINGERPRINT)  # no station.json, and nothing of this backbone to adopt
    state.store(digits)  # stored but never committed: petah's, and no entry names it
    (tmp_path / ".station.json.a1b2c3d4.tmp").write_text("{")  # an interrupted write of petah's
    state.commit({})
    left = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert left == {f"packages/{name}" for name in theirs} | {f"packages/sub/{sha_of(digits)}.petah", "station.json"}


def test_a_symlinked_packages_folder_is_refused_and_its_target_untouched(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / f"{sha_of(DIGITS.read_bytes())}.petah").write_bytes(DIGITS.read_bytes())
    state = tmp_path / "state"
    state.mkdir()
    (state / "packages").symlink_to(elsewhere)
    with pytest.raises(PetahError, match="packages/ is a symlink"):
        StateDir(state, FINGERPRINT)
    assert len(list(elsewhere.iterdir())) == 1


def test_a_lost_station_json_is_rebuilt_from_the_stored_versions(tmp_path, backbone):
    labels = list(read_package(DIGITS).manifest.labels)
    v2 = encode_package(synthetic_package(backbone, "digits", PlanConfig(preset="petah"), classes=len(labels),
                                          seed=5, labels=labels))
    config = ServeConfig(engine="torch", threads=1)
    station = Station(backbone, tmp_path, config, packages=[DIGITS, TEXTURES])
    station.install(v2)
    served = {t["name"]: (t["version"], t["previous_version"]) for t in station.task_list()}
    (tmp_path / "station.json").unlink()
    old = time.time() - 60
    os.utime(tmp_path / "packages" / f"{sha_of(DIGITS.read_bytes())}.petah", (old, old))  # v1 is the older one
    with pytest.warns(PetahWarning, match="station.json is missing; serving the 2 task"):
        again = Station(backbone, tmp_path, config)
    assert {t["name"]: (t["version"], t["previous_version"]) for t in again.task_list()} == served
    assert len(list((tmp_path / "packages").iterdir())) == 3  # both digits versions and textures, kept


def test_serve_refuses_a_packages_folder_inside_its_state_dir(tmp_path):
    inside = tmp_path / "state" / "mine"
    inside.mkdir(parents=True)
    (inside / "a.petah").write_bytes(DIGITS.read_bytes())
    proc = petah_process("serve", "--demo", "--state-dir", tmp_path / "state", "--packages", inside, "--port", "0",
                         ok=False)
    assert proc.returncode != 0 and "is inside --state-dir" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (inside / "a.petah").read_bytes() == DIGITS.read_bytes()


def test_a_missing_package_file_drops_that_task_and_serves_the_rest(tmp_path, backbone):
    config = ServeConfig(engine="torch", threads=1)
    Station(backbone, tmp_path, config, packages=[DIGITS, TEXTURES])
    (tmp_path / "packages" / f"{sha_of(TEXTURES.read_bytes())}.petah").unlink()
    with pytest.warns(PetahWarning, match="task textures version .* does not load"):
        station = Station(backbone, tmp_path, config)
    assert [t["name"] for t in station.task_list()] == ["digits"]


# --- errors name the client's inputs, never a server path --------------------------------------------
def test_refused_uploads_name_the_upload_not_server_paths(tmp_path, backbone):
    trust = tmp_path / "keys"
    trust.mkdir()
    generate_keypair(trust / "release")
    state = tmp_path / "state"
    plain = Station(backbone, state, ServeConfig(engine="torch", threads=1))
    signed_only = Station(backbone, tmp_path / "signed-state", ServeConfig(engine="torch", threads=1,
                                                                          trust=str(trust), require_signed=True))
    broken = DIGITS.read_bytes()[:-100]
    cases = [(plain, broken, "digits", "the uploaded package"),
             (plain, DIGITS.read_bytes(), "bad name!", "the task name in the request"),
             (signed_only, DIGITS.read_bytes(), "digits", "not signed")]
    for station, data, name, needle in cases:
        with pytest.raises(PetahError) as refused:
            station.install(data, name)
        message = station.client_message(str(refused.value))
        assert needle in message, message
        assert str(tmp_path) not in message and str(tmp_path.resolve()) not in message, message
    assert not list((state / "packages").iterdir())  # nothing refused was kept


# --- the front door: idle and slow sockets ------------------------------------------------------------
def test_a_thousand_idle_sockets_and_slowloris_do_not_lock_clients_out(tokens, tmp_path):
    with sockets_allowed(1200), station_process(
            "-b", str(demo_backbone_path()), "-p", str(DIGITS), "--state-dir", str(tmp_path / "s"),
            "--token-file", str(tokens / "api"), "--threads", "1", "--engine", "torch",
            "--header-timeout-s", "2", "--max-connections", "600") as (_proc, url):
        idle, slow = idle_and_slow_clients(url, 1000, 30)  # past --max-connections: the oldest idle are evicted
        try:
            client = StationClient(url, token=API, timeout=5)
            for _ in range(3):
                started = time.perf_counter()
                assert client.request("GET", "/healthz").status == 200
                assert client.predict([("part.png", png_bytes())]).status == 200
                assert time.perf_counter() - started < 1.0
                for sock in slow:
                    sock.sendall(b"X-Trickle: 1\r\n")  # still sending: only the header deadline stops it
                time.sleep(0.5)
            assert closed_by_server(idle[0], 1)  # evicted at the cap
            assert all(closed_by_server(sock, 3) for sock in slow + idle[-5:])  # past the header deadline
            assert client.request("GET", "/healthz").status == 200
        finally:
            for sock in idle + slow:
                sock.close()


def test_with_a_token_the_api_schema_needs_it_and_no_page_loads_from_a_cdn(tokens, tmp_path):
    with station_process("-b", str(demo_backbone_path()), "--state-dir", str(tmp_path / "s"),
                         "--token-file", str(tokens / "api"), "--threads", "1", "--engine", "torch") as (_proc, url):
        anonymous, holder = StationClient(url), StationClient(url, token=API)
        assert anonymous.request("GET", "/openapi.json").status == 401
        schema = holder.request("GET", "/openapi.json")
        assert schema.status == 200 and "/v1/predict" in schema.json()["paths"]
        assert anonymous.request("GET", "/docs").status == 404 and anonymous.request("GET", "/redoc").status == 404
        assert anonymous.request("GET", "/healthz").status == 200 and anonymous.request("GET", "/").status == 200
        page = anonymous.request("GET", "/").body.decode()
        assert "https://" not in page and "http://" not in page


# --- a state dir that cannot be written ------------------------------------------------------------
@contextlib.contextmanager
def small_filesystem(path, size: str):
    """A tmpfs of ``size`` mounted at ``path`` (needs root: skipped elsewhere)."""
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def served(client: StationClient) -> list[dict]:
    """What a station serves, without its drift check's counts (answering moves them)."""
    return [{k: v for k, v in task.items() if k != "drift"} for task in client.tasks()]


def test_a_read_only_or_full_state_dir_refuses_changes_with_503_and_changes_nothing(tokens, tmp_path):
    labels = list(read_package(DIGITS).manifest.labels)
    v2 = encode_package(synthetic_package(create_backbone(weights=str(demo_backbone_path())), "digits",
                                          PlanConfig(preset="petah"), classes=len(labels), seed=5, labels=labels))
    common = ("-b", str(demo_backbone_path()), "--admin-token-file", str(tokens / "admin"), "--threads", "1",
              "--engine", "torch")
    with small_filesystem(tmp_path / "disk", "3m") as disk:
        state = disk / "state"
        with station_process(*common, "--state-dir", str(state), "-p", str(DIGITS), "-p", str(TEXTURES)) as (_, url):
            client = StationClient(url)
            assert client.install("digits", v2, ADMIN).status == 200
            before = served(client)
            stored = sorted(p.name for p in (state / "packages").iterdir())
            assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
            try:
                for reply in (client.delete("textures", ADMIN), client.rollback("digits", ADMIN),
                              client.install("digits", DIGITS.read_bytes()[:-7] + b"changed", ADMIN)):
                    assert reply.status == 503, reply.body
                    error = reply.json()["error"]
                    assert "read-only" in error and str(tmp_path) not in error, error
                assert served(client) == before
                assert client.predict([("a.png", png_bytes())], tasks=["textures"]).status == 200
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(disk)])
            assert sorted(p.name for p in (state / "packages").iterdir()) == stored
            with contextlib.suppress(OSError), open(disk / "filler", "wb") as filler:
                while True:
                    filler.write(b"\0" * 65536)
                    filler.flush()
            full = client.install("fresh", v2[:-1] + b"\1", ADMIN)  # another package's bytes: needs new space
            assert full.status == 503 and "disk is full" in full.json()["error"], full.body
            assert served(client) == before
        (disk / "filler").unlink()
        (state / "packages" / f"{sha_of(TEXTURES.read_bytes())}.petah").unlink()  # one stored package lost
        listed = (state / "station.json").read_bytes()
        assert subprocess.run(["mount", "-o", "remount,ro", str(disk)]).returncode == 0
        try:  # a start on a read-only disk serves every task that loads and reports the rest
            with station_process(*common, "--state-dir", str(state)) as (_, url):
                assert [(t["name"], t["version"]) for t in StationClient(url).tasks()] == [
                    ("digits", sha_of(v2)[:12])]
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(disk)])
        assert (state / "station.json").read_bytes() == listed
