"""Fleet: TUF metadata checks against the attacks they exist for, the hub's refusals, staged
rollout with gate, halt, withdraw and return, over a real hub on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata
from tuf.ngclient import Updater

from conftest import FolderFetcher, fleet_station, free_port
from petah.backbones import create_backbone, demo_backbone_path
from petah.bench.fleet import digits_versions, golden_digits, sha256_file, wait_for
from petah.errors import PetahError
from petah.fleet.agent import Agent
from petah.fleet.client import hub_status, publish_release, sign_release, withdraw_release
from petah.fleet.hub import Hub, add_device
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository, rotate_targets_key, signer
from petah.fleet.registry import stage_rank
from petah.packages import generate_keypair, read_package
from petah.serve import demo_packages

DIGITS = Path(next(p for p in demo_packages() if p.stem == "digits"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name in ("root", "release", "release2", "intruder"):
        generate_keypair(folder / name)
    return folder


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(weights=str(demo_backbone_path()))


@pytest.fixture(scope="module")
def packages(tmp_path_factory, backbone):
    """Two good versions of digits (the demo package, and the same signed: other bytes), a bad one
    (random adapters and head: near chance on the golden set) and one for another backbone."""
    return digits_versions(tmp_path_factory.mktemp("packages"), backbone)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_digits(tmp_path_factory.mktemp("golden"))


def new_hub(tmp: Path, keys: Path) -> tuple[Path, Path]:
    root = tmp / "hub"
    trusted = init_repository(root, keys / "root.key", keys / "release.key")
    return root, trusted


def publish(hub: Hub, package: Path, key: Path, **settings) -> dict:
    data, targets = sign_release(package, hub.repository.current_targets(), key)
    return hub.publish(data, targets, settings)


def updater(tmp: Path, hub_root: Path, trusted: Path, name: str = "client") -> Updater:
    metadata = tmp / name / "metadata"
    if not metadata.exists():
        metadata.mkdir(parents=True)
        shutil.copyfile(trusted, metadata / "root.json")
    return Updater(str(metadata), "http://hub/metadata/", str(tmp / name / "targets"), "http://hub/targets/",
                   fetcher=FolderFetcher(hub_root), bootstrap=None)


def resign(path: Path, key: Path, **changes) -> None:
    """Rewrite a metadata file with ``changes`` to its signed part, signed by ``key`` alone."""
    metadata = Metadata.from_bytes(path.read_bytes())
    for field, value in changes.items():
        setattr(metadata.signed, field, value)
    metadata.signatures.clear()
    metadata.sign(signer(key))
    path.write_bytes(metadata.to_bytes())


def test_metadata_refuses_rollback_freeze_untrusted_keys_and_bad_bytes(tmp_path, keys, packages):
    root, trusted = new_hub(tmp_path, keys)
    hub = Hub(root)
    first = publish(hub, packages["good"], keys / "release.key")
    client = updater(tmp_path, root, trusted)
    client.refresh()
    info = client.get_targetinfo(first["target"])
    assert info.unrecognized_fields["custom"]["backbone"] == read_package(DIGITS).manifest.backbone.fingerprint
    assert Path(client.download_target(info, str(tmp_path / "got.petah"))).read_bytes() == packages["good"].read_bytes()

    timestamp = root / "metadata" / "timestamp.json"
    old = timestamp.read_bytes()
    publish(hub, packages["again"], keys / "release.key")
    updater(tmp_path, root, trusted).refresh()  # the client now trusts the newer timestamp
    newest = timestamp.read_bytes()
    timestamp.write_bytes(old)  # rollback attack: an older, validly signed version served again
    with pytest.raises(tuf_errors.BadVersionNumberError):
        updater(tmp_path, root, trusted).refresh()

    timestamp.write_bytes(newest)
    hub.repository.refresh(force=True, lifetime={"timestamp": dt.timedelta(seconds=-60)})  # freeze attack
    with pytest.raises(tuf_errors.ExpiredMetadataError):
        updater(tmp_path, root, trusted).refresh()

    hub.repository.refresh(force=True)
    version = Metadata.from_bytes(timestamp.read_bytes()).signed.version
    resign(timestamp, keys / "intruder.key", version=version + 1)  # signed by a key the root does not name
    with pytest.raises(tuf_errors.UnsignedMetadataError):
        updater(tmp_path, root, trusted).refresh()

    hub.repository.refresh(force=True)
    fresh = updater(tmp_path, root, trusted, "fresh")
    fresh.refresh()
    info = fresh.get_targetinfo(first["target"])
    stored = root / "targets" / "digits" / f"{info.hashes['sha256']}.{Path(first['target']).name}"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0x01  # same length, other bytes
    stored.write_bytes(bytes(data))
    with pytest.raises(tuf_errors.LengthOrHashMismatchError):
        fresh.download_target(info, str(tmp_path / "never.petah"))
    assert not (tmp_path / "never.petah").exists()


def test_hub_refuses_bad_uploads_and_follows_a_targets_key_rotation(tmp_path, keys, packages):
    root, trusted = new_hub(tmp_path, keys)
    hub = Hub(root)
    current = hub.repository.current_targets()
    with pytest.raises(PetahError, match="by this release key"):  # the publisher signs only on top of its own
        sign_release(packages["good"], current, keys / "intruder.key")
    data, targets = sign_release(packages["good"], current, keys / "release.key")
    forged = tmp_path / "forged.json"
    forged.write_bytes(targets)
    resign(forged, keys / "intruder.key")
    with pytest.raises(PetahError, match="not signed by the targets key"):
        hub.publish(data, forged.read_bytes(), {})
    with pytest.raises(PetahError, match="does not name the uploaded package"):
        hub.publish(packages["again"].read_bytes(), targets, {})
    with pytest.raises(PetahError, match="--stages"):
        hub.publish(data, targets, {"stages": [50, 10]})
    hub.publish(data, targets, {})
    with pytest.raises(PetahError, match="version 2; the hub is at 2"):  # signed against an older state
        hub.publish(*sign_release(packages["again"], current, keys / "release.key"), {})
    assert len(list((root / "targets" / "digits").iterdir())) == 1  # nothing of the refused uploads stored

    client = updater(tmp_path, root, trusted)
    client.refresh()
    assert rotate_targets_key(root, keys / "root.key", keys / "release2.key") == 2
    with pytest.raises(PetahError, match="by this release key"):  # the old release key is out
        publish(hub, packages["again"], keys / "release.key")
    release = publish(hub, packages["again"], keys / "release2.key")
    client = updater(tmp_path, root, trusted)  # provisioned with root v1: follows the chain to v2
    client.refresh()
    assert client.get_targetinfo(release["target"]) is not None
    assert Metadata.from_bytes((tmp_path / "client" / "metadata" / "root.json").read_bytes()).signed.version == 2


def versions(agents) -> list[str | None]:
    return [a.station.state.entries["digits"].sha256 if "digits" in a.station.state.entries else None
            for a in agents]




def test_staged_rollout_gates_halts_withdraws_and_returns(tmp_path, keys, packages, golden, backbone):
    root, trusted = new_hub(tmp_path, keys)
    with running_hub(Hub(root)) as (url, _server):
        agents = [fleet_station(backbone, tmp_path, url, root, trusted, f"dev{i}", golden) for i in range(3)]
        try:
            for agent in agents:
                agent.step()  # check in: the hub learns each backbone

            def rounds(n: int = 3):
                for _ in range(n):
                    for agent in agents:
                        agent.step()

            settings = {"stages": [34, 100], "min_healthy": 1.0, "max_failed": 0.5}
            first = publish_release(packages["good"], url, keys / "release.key", **settings)
            rounds()
            assert versions(agents) == [sha256_file(packages["good"])] * 3
            second = publish_release(packages["again"], url, keys / "release.key", **settings)
            rounds()
            assert versions(agents) == [sha256_file(packages["again"])] * 3
            status = {r["id"]: r for r in hub_status(url)["releases"]}
            assert status[first["release"]]["state"] == status[second["release"]]["state"] == "complete"
            assert agents[0].station.task_list()[0]["previous_version"] == sha256_file(packages["good"])[:12]

            withdraw_release(second["release"], url, keys / "release.key")  # by hand: back to the first
            rounds(1)
            assert versions(agents) == [sha256_file(packages["good"])] * 3

            bad = publish_release(packages["bad"], url, keys / "release.key", min_score=90.0, **settings)
            rounds()
            status = {r["id"]: r for r in hub_status(url)["releases"]}[bad["release"]]
            assert status["state"] == "halted" and status["stage"] == 0 and status["counts"]["failed"] >= 1
            assert versions(agents) == [sha256_file(packages["good"])] * 3  # never served
            events = [e for a in agents for e in a.audit.read_text().splitlines() if '"gate_rejected"' in e]
            assert events and "accuracy" in events[0]
            last = max(agents, key=lambda a: stage_rank(a.device_id))  # outside the first stage (2 of 3)
            assert '"gate_rejected"' not in last.audit.read_text()

            # a hub answer pointing at a release for another backbone is refused by the station itself
            foreign = sign_release(packages["foreign"], Hub(root).repository.current_targets(), keys / "release.key")
            Hub(root).repository.accept_targets(foreign[1], {
                f"digits/{hashlib.sha256(foreign[0]).hexdigest()}.petah": foreign[0]})
            agents[0].update("digits", {"sha256": hashlib.sha256(foreign[0]).hexdigest(), "release": None,
                                        "target": f"digits/{hashlib.sha256(foreign[0]).hexdigest()}.petah"})
            assert '"incompatible"' in agents[0].audit.read_text().splitlines()[-1]
            assert versions(agents)[0] == sha256_file(packages["good"])

            # a failed health window rolls back by itself
            agents[1].probe_seconds = lambda task: None  # non-finite outputs from now on
            agents[1].station.candidates.clear()
            path = tmp_path / "candidate.petah"
            shutil.copyfile(packages["again"], path)
            agents[1]._promote("digits", sha256_file(packages["again"]), 99, path, {})
            assert versions(agents)[1] == sha256_file(packages["good"])
            assert '"health_rollback"' in agents[1].audit.read_text().splitlines()[-1]
            assert sha256_file(packages["again"]) in Agent(agents[1].station).rejected  # kept across restarts

            # the only active release withdrawn, its predecessor withdrawn too: stations stop serving the task
            withdraw_release(first["release"], url, keys / "release.key")
            rounds(1)
            assert versions(agents) == [None] * 3
        finally:
            for agent in agents:
                agent.station.stop()


def test_the_publisher_refuses_to_build_on_targets_older_than_it_signed(tmp_path, keys, packages):
    """A hub that rolls its metadata back to before a withdrawal (the withdrawn release listed
    again, under a valid old signature of the release key) is caught by the publisher's pin."""
    root, _trusted = new_hub(tmp_path, keys)
    with running_hub(Hub(root)) as (url, _server):
        first = publish_release(packages["good"], url, keys / "release.key", stages=[100])
        withdraw_release(first["release"], url, keys / "release.key")  # targets version 3, without it
        (root / "metadata" / "3.targets.json").unlink()  # the hub offers version 2 again: the release is back
        with pytest.raises(PetahError, match="the hub offers targets version 2, but .* last signed version 3"):
            publish_release(packages["again"], url, keys / "release.key", stages=[100])
        assert json.loads((keys / "release.targets-pins.json").read_text())[url]["version"] == 3


def test_reports_queued_on_disk_reach_the_hub_after_a_restart(tmp_path, keys, golden, backbone):
    """The hub away, the station killed with reports queued: a restarted agent sends them all."""
    root, trusted = new_hub(tmp_path, keys)
    hub = Hub(root)
    port = free_port()
    agent = fleet_station(backbone, tmp_path, f"http://127.0.0.1:{port}", root, trusted, "dev0", golden)
    try:
        agent.log("gate_passed", "digits", None, "before the restart")
        with pytest.raises(PetahError, match="cannot reach"):
            agent.flush()  # the hub is away: nothing lost
        with open(agent.outbox.queue_path, "ab") as handle:
            handle.write(b'{"event": "prom')  # killed mid-append: a torn line
        restarted = Agent(agent.station)  # the station started again: the queue is on disk
        restarted.log("promoted", "digits", None, "after the torn line")
        with running_hub(hub, port=port):
            restarted.flush()
        reports = hub.registry.db.all("SELECT event, detail FROM reports WHERE device='dev0' ORDER BY at")
        assert [(r["event"], r["detail"]) for r in reports] == [("gate_passed", "before the restart"),
                                                                ("promoted", "after the torn line")]
        assert restarted.outbox.backlog_bytes == 0
        restarted.stop()
    finally:
        agent.station.stop()


def test_fleet_simulation_with_faults_keeps_every_station_consistent(tmp_path):
    """The bench's outcome contract on 4 stations (one a child process killed with SIGKILL while it
    installs): dropped, truncated and corrupted downloads, delays, the hub down for a while."""
    from petah.bench.fleet import OUTCOMES, run_fleet_bench

    result = run_fleet_bench(4, poll_s=0.3, health_window_s=0.5, timeout_s=120, hub_down_s=2.0, workdir=tmp_path)
    assert {k: result[k] for k in OUTCOMES} == dict.fromkeys(OUTCOMES, True), result
    assert result["releases"]["bad"]["state"] == "halted" and result["releases"]["again"]["state"] == "complete"
    assert result["child_station"]["killed_after"] == "installed"
    assert result["releases"]["good"]["bytes_vs_whole_model"] < 0.1
    assert not list(tmp_path.iterdir())  # the bench cleans up after itself


def test_a_managed_station_refuses_changes_by_hand_and_bad_options(tmp_path, keys):
    from petah.serve.client import StationClient, station_process

    root, trusted = new_hub(tmp_path, keys)
    add_device(root, "line-1", tmp_path / "line-1.token")
    admin = tmp_path / "admin"
    admin.write_text("admin-token-for-fleet-tests-0123\n")
    with running_hub(Hub(root)) as (url, _server):
        hub_options = ("--hub", url, "--trust-root", str(trusted), "--device-id", "line-1",
                       "--device-token-file", str(tmp_path / "line-1.token"))
        with station_process("--demo", "--state-dir", str(tmp_path / "state"), "--admin-token-file", str(admin),
                             "--threads", "1", "--engine", "torch", *hub_options) as (_proc, station_url):
            client = StationClient(station_url)
            reply = client.rollback("digits", "admin-token-for-fleet-tests-0123")
            assert reply.status == 403 and "--allow-manual" in reply.json()["error"]
            row = client.tasks()[0]
            assert {"version", "previous_version", "candidate_version"} <= set(row)
            assert wait_for(lambda: [d["id"] for d in Hub(root).registry.devices() if d["backbone"]] == ["line-1"], 30)
        with station_process("--demo", "--state-dir", str(tmp_path / "manual"), "--admin-token-file", str(admin),
                             "--threads", "1", "--engine", "torch", "--allow-manual", *hub_options) as (_p, manual):
            reply = StationClient(manual).delete("digits", "admin-token-for-fleet-tests-0123")
            assert reply.status == 200 and "digits" not in [t["name"] for t in StationClient(manual).tasks()]
    for options, needle in ((("--hub", url), "--hub needs --trust-root, --device-id, --device-token-file"),
                            (("--trust-root", str(trusted)), "go with --hub")):
        with pytest.raises(PetahError, match=needle):
            with station_process("--demo", "--state-dir", str(tmp_path / "other"), *options, timeout=60):
                pass


def test_a_station_checks_its_device_id_without_importing_the_hub(tmp_path):
    """--device-id is checked by petah.fleet.ids: a station loads neither the hub (its app, its SQLite
    registry) nor the fleet bench's fault injection."""
    for name in ("root.json", "line-1.token"):
        (tmp_path / name).write_text("x" * 20)
    code = ("import sys, petah.serve.app, petah.fleet.agent; from petah.serve import ServeConfig; "
            f"ServeConfig(hub='http://127.0.0.1:1', trust_root={str(tmp_path / 'root.json')!r}, device_id='line-1', "
            f"device_token_file={str(tmp_path / 'line-1.token')!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('petah.fleet.hub', 'petah.fleet.registry', "
            "'petah.fleet.routers', 'petah.bench', 'sqlite3'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stdout


def test_hub_answers_hostile_requests_with_400(tmp_path, keys, packages):
    from petah.fleet.client import _multipart, call

    root, _trusted = new_hub(tmp_path, keys)
    add_device(root, "dev", tmp_path / "dev.token")
    token = (tmp_path / "dev.token").read_text().strip()
    with running_hub(Hub(root)) as (url, _server):
        data, targets = sign_release(packages["good"], Hub(root).repository.current_targets(), keys / "release.key")
        device = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        cases = [
            ("/v1/releases", _multipart({"package": b"junk", "targets": b"{}", "settings": b"{}"}), {}, "TUF"),
            ("/v1/releases", _multipart({"package": data, "targets": targets, "settings": b'{"min_score": "x"}'}),
             {}, "min_score must be a finite number"),
            ("/v1/releases", _multipart({"package": data, "targets": targets, "settings": b'{"max_failed": 1e999}'}),
             {}, "max_failed must be a finite number"),
            ("/v1/releases", _multipart({"package": data, "targets": targets, "settings": b"[1]"}), {},
             "JSON object"),
            ("/v1/releases/99999999999999999999/withdraw", (b"{}", "application/json"), {}, "release id"),
            ("/v1/devices/dev/report", (b'{"event": "promoted", "bytes": 99999999999999999999}', None), device,
             "bytes must be"),
            ("/v1/devices/dev/poll", (b'{"installed": [1]}', None), device, "installed must map"),
            ("/v1/devices/dev/poll", (b'{"installed": {}}', None), {}, "HTTP 401"),
            ("/v1/devices/../poll", (b"{}", None), device, "HTTP 4"),
        ]
        for path, (body, content_type), headers, needle in cases:
            headers = {**headers, **({"Content-Type": content_type} if content_type else {})}
            with pytest.raises(PetahError, match=needle):
                call(f"{url}{path}", "POST", body, headers)
        assert hub_status(url)["releases"] == []  # nothing was published
