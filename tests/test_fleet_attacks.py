"""Attacks on a fleet update, after Uptane's reference list, against a hub with a director key:
the station (a real one, polling a real hub on 127.0.0.1) must end each attack running what it ran
before, or — where the stolen keys allow a listed release — stopped by its golden-set gate.

The attacker owns the hub's API (an ASGI layer answering polls as it likes, or replaying what it
saw), its database and its folder (the online snapshot / timestamp key), and in some tests a
stolen director or release key. docs/deploy.md's "Keys and what a thief can do" names these tests.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from pathlib import Path

import pytest
from starlette.middleware import Middleware
from tuf.api import exceptions as tuf_errors

from conftest import fleet_station
from petah.backbones import create_backbone, demo_backbone_path
from petah.bench.fleet import digits_versions, golden_digits, sha256_file
from petah.errors import PetahError
from petah.fleet import agent as agent_module
from petah.fleet import assignments
from petah.fleet.agent import Agent
from petah.fleet.assignments import Director
from petah.fleet.client import publish_release, sign_release
from petah.fleet.hub import Hub
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository, release_targets, rotate_director_key, signer, target_path
from petah.packages import generate_keypair

pytestmark = pytest.mark.server


class Impostor:
    """The hub's API in an attacker's hands: answers polls with ``answer`` while it is set, and
    keeps every poll answer it passed on (to replay)."""

    def __init__(self):
        self.answer: dict | None = None
        self.seen: list[dict] = []

    def middleware(self) -> Middleware:
        return Middleware(_ImpostorLayer, impostor=self)


class _ImpostorLayer:
    def __init__(self, app, impostor: Impostor):
        self.app, self.impostor = app, impostor

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/poll"):
            return await self.app(scope, receive, send)
        if self.impostor.answer is not None:
            body = json.dumps(self.impostor.answer).encode()
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            return await send({"type": "http.response.body", "body": body})
        chunks = []

        async def keep(message):
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)
        await self.app(scope, receive, keep)
        self.impostor.seen.append(json.loads(b"".join(chunks)))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    for name in ("root", "release", "director", "director2"):
        generate_keypair(folder / name)
    return folder


@pytest.fixture(scope="module")
def backbone():
    return create_backbone(weights=str(demo_backbone_path()))


@pytest.fixture(scope="module")
def packages(tmp_path_factory, backbone):
    return digits_versions(tmp_path_factory.mktemp("packages"), backbone)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    return golden_digits(tmp_path_factory.mktemp("golden"))


@dataclasses.dataclass
class Fleet:
    root: Path
    url: str
    hub: Hub
    impostor: Impostor
    agent: Agent
    keys: Path

    def running(self) -> str | None:
        entry = self.agent.station.state.entries.get("digits")
        return entry.sha256 if entry else None

    def signed(self, key: str, answer: dict, device: str = "dev0", counter: int | None = None) -> dict:
        """A poll answer with an assignment as ``key`` (a key file) would sign it."""
        director = Director(signer(key), key)
        counter = counter if counter is not None else self.agent.last_counter[1] + 1
        return {"assignment": director.sign(device, self.agent.station.backbone.fingerprint, counter, answer)}

    def audit(self) -> str:
        return self.agent.audit.read_text()


def want(package: Path, release: int = 99) -> dict:
    sha = sha256_file(package)
    return {"desired": {"digits": {"release": release, "target": target_path("digits", sha), "sha256": sha,
                                   "min_score": None}}, "withdrawn": {}}


@pytest.fixture
def fleet(tmp_path, keys, packages, golden, backbone, monkeypatch):
    """A hub with a director, one station running the good version of digits through it."""
    monkeypatch.setattr(agent_module, "MAX_TRIES", 1)  # a refused download is not retried here
    root = tmp_path / "hub"
    trusted = init_repository(root, keys / "root.key", keys / "release.key", keys / "director.pub")
    hub = Hub(root, director_key=keys / "director.key")
    impostor = Impostor()
    with running_hub(hub, middleware=[impostor.middleware()]) as (url, _server):
        agent = fleet_station(backbone, tmp_path, url, root, trusted, "dev0", golden)
        station = agent.station
        try:
            agent.step()
            publish_release(packages["good"], url, keys / "release.key", stages=[100])
            agent.step()
            assert station.state.entries["digits"].sha256 == sha256_file(packages["good"])
            yield Fleet(root, url, hub, impostor, agent, keys)
        finally:
            station.stop()


def test_arbitrary_package_without_keys_is_refused(fleet, packages):
    """No keys: an unsigned answer is not acted on; the hub's database edited to name another
    package (its director signs what the database says) is refused by TUF: not in the targets."""
    good = fleet.running()
    fleet.impostor.answer = want(packages["bad"])  # the old, unsigned answer form
    with pytest.raises(PetahError, match="carries no director assignment"):
        fleet.agent.step()
    fleet.impostor.answer = None

    sha = sha256_file(packages["bad"])
    folder = fleet.root / "targets" / "digits"
    shutil.copyfile(packages["bad"], folder / f"{sha}.{sha}.petah")  # the hub's folder holds it, unsigned
    fleet.hub.registry.db.transaction(lambda db: db.execute(
        "UPDATE releases SET sha256=?, target=?", (sha, target_path("digits", sha))))
    fleet.agent.step()
    assert fleet.running() == good
    assert "not in the hub's signed targets metadata" in fleet.audit().splitlines()[-1]


def test_replayed_assignment_and_metadata_are_refused(fleet, packages, monkeypatch):
    """An old assignment (captured in transit) replayed, an expired one, old timestamp metadata."""
    good = fleet.running()
    captured = fleet.impostor.seen[-1]
    fleet.agent.step()  # a newer assignment taken since
    fleet.impostor.answer = captured
    with pytest.raises(PetahError, match="is a replay: counter"):
        fleet.agent.step()

    # a stolen key's counter far ahead would make every honest assignment after it a "replay"
    ahead = int((dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).timestamp() * 1000)
    fleet.impostor.answer = fleet.signed(fleet.keys / "director.key", {"desired": {}, "withdrawn": {}}, counter=ahead)
    with pytest.raises(PetahError, match="is ahead of this station's clock"):
        fleet.agent.step()
    fleet.impostor.answer = None
    fleet.agent.step()  # honest answers still taken

    monkeypatch.setattr(assignments, "LIFETIME", dt.timedelta(seconds=-1))
    fleet.impostor.answer = fleet.signed(fleet.keys / "director.key", want(packages["again"]))
    with pytest.raises(PetahError, match="assignment expired"):
        fleet.agent.step()
    fleet.impostor.answer = None
    monkeypatch.undo()

    stamp = fleet.root / "metadata" / "timestamp.json"
    old = stamp.read_bytes()
    fleet.agent._updater()
    fleet.hub.repository.refresh(force=True)  # a newer timestamp the station sees
    fleet.agent._updater()
    stamp.write_bytes(old)  # the hub serves the old one again (a freeze or a replay)
    with pytest.raises(tuf_errors.BadVersionNumberError):
        fleet.agent._updater()
    assert fleet.running() == good


def test_a_compromised_online_key_cannot_assign_or_add_packages(fleet, packages):
    """The hub's online key (snapshot / timestamp, in its folder) signs neither assignments nor targets."""
    good, online = fleet.running(), fleet.root / "keys" / "online.key"
    fleet.impostor.answer = fleet.signed(online, want(packages["bad"]))
    with pytest.raises(PetahError, match="not signed by the director key"):
        fleet.agent.step()
    forged = release_targets(fleet.hub.repository.current_targets(), online,
                             add={target_path("digits", sha256_file(packages["bad"])): (
                                 packages["bad"].read_bytes(), {"task": "digits"})},
                             current_signed_by=fleet.hub.repository.latest("root"))
    with pytest.raises(PetahError, match="not signed by the targets key"):
        fleet.hub.repository.accept_targets(forged, {})
    assert fleet.running() == good


def test_a_stolen_director_key_alone(fleet, packages, keys):
    """The director key alone picks among listed releases only: a package outside the signed
    targets is refused, another device's assignment is refused, and a listed release the rollout
    halted (pushed past its stage) still meets the station's golden-set gate."""
    good, director = fleet.running(), keys / "director.key"
    fleet.impostor.answer = fleet.signed(director, want(packages["foreign"]))  # in no signed targets
    fleet.agent.step()
    assert "not in the hub's signed targets metadata" in fleet.audit().splitlines()[-1]
    fleet.impostor.answer = fleet.signed(director, want(packages["bad"]), device="dev1")
    with pytest.raises(PetahError, match="assignment is for device 'dev1', not 'dev0'"):
        fleet.agent.step()

    fleet.impostor.answer = None
    bad = publish_release(packages["bad"], fleet.url, keys / "release.key", stages=[100])
    fleet.hub.registry.operate(bad["release"], "halt")  # listed in the targets, rolled back by the hub
    fleet.impostor.answer = fleet.signed(director, want(packages["bad"], bad["release"]))
    fleet.agent.step()
    assert fleet.running() == good
    assert '"gate_rejected"' in fleet.audit().splitlines()[-1]


def test_director_and_online_keys_together_still_need_the_release_key(fleet, packages, keys):
    """Both online keys: an assignment to a package of the attacker's, and targets naming it signed
    by either key, are refused; only with the release key too is a package listed — and then the
    gate, comparing it with what the station runs, is what stands (and rejects a bad one)."""
    good = fleet.running()
    sha = sha256_file(packages["bad"])
    for thief in (fleet.root / "keys" / "online.key", keys / "director.key"):
        forged = release_targets(fleet.hub.repository.current_targets(), thief,
                                 add={target_path("digits", sha): (packages["bad"].read_bytes(), {"task": "digits"})},
                                 current_signed_by=fleet.hub.repository.latest("root"))
        with pytest.raises(PetahError, match="not signed by the targets key"):
            fleet.hub.repository.accept_targets(forged, {target_path("digits", sha): packages["bad"].read_bytes()})
    fleet.impostor.answer = fleet.signed(keys / "director.key", want(packages["bad"]))
    fleet.agent.step()
    assert "not in the hub's signed targets metadata" in fleet.audit().splitlines()[-1]

    data, targets = sign_release(packages["bad"], fleet.hub.repository.current_targets(), keys / "release.key")
    fleet.hub.repository.accept_targets(targets, {target_path("digits", sha): data})  # all three keys
    fleet.impostor.answer = fleet.signed(keys / "director.key", want(packages["bad"]))
    fleet.agent.step()
    assert fleet.running() == good
    assert '"gate_rejected"' in fleet.audit().splitlines()[-1]


def test_a_director_key_revoked_and_recovered_through_the_root_key(fleet, packages, keys):
    """The root key names a new director: the old key's assignments are refused (the station
    refreshes its root before acting), the hub holding the old key stops answering, and a hub
    started with the new key rolls the station forward."""
    good = fleet.running()
    version = rotate_director_key(fleet.root, keys / "root.key", keys / "director2.pub")
    assert version == 2
    with pytest.raises(PetahError, match="is not the director key the hub's root metadata names"):
        Hub(fleet.root, director_key=keys / "director.key")
    with pytest.raises(PetahError, match="HTTP 503.*another director key than this hub process holds"):
        fleet.agent.step()  # the running hub noticed the new root
    fleet.impostor.answer = fleet.signed(keys / "director.key", want(packages["again"]))
    with pytest.raises(PetahError, match="not signed by the director key"):
        fleet.agent.step()  # the thief's old key: the station followed the root to version 2
    assert fleet.running() == good

    fleet.impostor.answer = None
    recovered = Hub(fleet.root, director_key=keys / "director2.key")
    with running_hub(recovered) as (url, _server):
        fleet.agent.hub = url
        publish_release(packages["again"], url, keys / "release.key", stages=[100])
        fleet.agent.step()
    assert fleet.running() == sha256_file(packages["again"])


def test_hub_refuses_to_serve_without_its_director_key(tmp_path, keys):
    root = tmp_path / "hub"
    init_repository(root, keys / "root.key", keys / "release.key", keys / "director.key")
    with pytest.raises(PetahError, match="names a director key: start the hub with --director-key"):
        Hub(root)
    with pytest.raises(PetahError, match="is not the director key"):
        Hub(root, director_key=keys / "release.key")
    plain = tmp_path / "plain"
    init_repository(plain, keys / "root.key", keys / "release.key")
    with pytest.raises(PetahError, match="names no director key"):
        Hub(plain, director_key=keys / "director.key")


def test_a_director_added_later_is_followed_by_stations_provisioned_before(tmp_path, keys, packages, golden,
                                                                           backbone):
    """A fleet started without a director; the root key names one: the hub without it stops
    answering (503), and a station whose trusted root predates the director follows the root
    chain on the first signed answer and takes it."""
    root = tmp_path / "hub"
    trusted = init_repository(root, keys / "root.key", keys / "release.key")
    agent = fleet_station(backbone, tmp_path, "http://127.0.0.1:1", root, trusted, "dev0", golden)  # hub set below
    station = agent.station
    try:
        with running_hub(Hub(root)) as (url, _server):
            agent.hub = url
            agent.step()  # unsigned answers: no director yet
            rotate_director_key(root, keys / "root.key", keys / "director.pub")
            with pytest.raises(PetahError, match="HTTP 503.*another director key"):
                agent.step()
        with running_hub(Hub(root, director_key=keys / "director.key")) as (url, _server):
            agent.hub = url
            publish_release(packages["good"], url, keys / "release.key", stages=[100])
            agent.step()
        assert station.state.entries["digits"].sha256 == sha256_file(packages["good"])
        assert agent.last_counter[0] == Director(signer(keys / "director.key"), "director.key").keyid
    finally:
        station.stop()


def test_the_gate_confirms_a_slowdown_before_it_refuses_by_time_alone(fleet, packages, monkeypatch):
    """(Not an attack: the gate on a busy device.) A refusal by the time rule alone is timed again
    and judged by each batch's fastest round: noise (slow medians, equal fastest rounds) passes, a
    real slowdown (both) is refused, naming the measurement."""
    from petah.fleet import gate

    calls = []

    def timed(candidate_median: float, candidate_fastest: float):
        def score(*_args):
            calls.append(1)
            return {"candidate": gate.Score("accuracy", 96.0, candidate_median, candidate_fastest),
                    "current": gate.Score("accuracy", 96.0, 0.100, 0.090)}
        return score

    path = fleet.root / "candidate.petah"
    shutil.copyfile(packages["again"], path)
    fleet.agent.rule = gate.GateRule()  # the station's default rule (the fixture's is lenient on time)
    monkeypatch.setattr(gate, "score_versions", timed(0.125, 0.091))  # 1.25x by medians, 1.01x fastest
    assert fleet.agent._check("digits", sha256_file(packages["again"]), 1, path, {}) is None and len(calls) == 2
    monkeypatch.setattr(gate, "score_versions", timed(0.150, 0.140))  # slower either way
    assert fleet.agent._check("digits", sha256_file(packages["again"]), 1, path, {}) == "gate_rejected"
    assert "1.56x the current version's time on the golden set (at most 1.2x), timed twice" in fleet.audit()
