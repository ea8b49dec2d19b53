"""A new backbone as one fleet release: the device backbone and every task re-adapted on it are
staged together; stations move to the pair at once (gated against the pair they run, watched),
never serve a package on a backbone it was not adapted on, keep the pair across a restart with
the old ``-b``, and move back together when the release fails, is halted or withdrawn."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import fleet_station
from petah.backbones import create_backbone, demo_backbone_path
from petah.backbones.factory import fingerprint
from petah.bench.fleet import golden_digits, sha256_file
from petah.device import read_device_backbone
from petah.errors import PetahError
from petah.export.device import export_device
from petah.fleet.agent import Agent
from petah.fleet.client import hub_status, publish_backbone, sign_backbone_release, withdraw_release
from petah.fleet.hub import Hub
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository
from petah.packages import encode_package, generate_keypair, read_package
from petah.plans import PlanConfig
from petah.serve import Station, demo_device_backbone, demo_packages
from petah.testing import synthetic_package

pytestmark = pytest.mark.server
DIGITS = Path(next(p for p in demo_packages() if p.stem == "digits"))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The demo backbone's successor (one weight nudged: another fingerprint, the same answers) as
    a device folder, the demo digits task re-adapted on it (``good``: its adapters and head bound
    to the new backbone) and a bad one (random adapters and head), and the golden set."""
    tmp = tmp_path_factory.mktemp("pair")
    backbone = create_backbone(weights=str(demo_backbone_path()))
    model = copy.deepcopy(backbone.model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-4
    new = dataclasses.replace(backbone, model=model, fingerprint=fingerprint(model))
    export_device(new, tmp / "new")
    good = read_package(DIGITS)
    good.manifest.backbone = dataclasses.replace(good.manifest.backbone, fingerprint=new.fingerprint)
    good.signature = ""
    (tmp / "good.petah").write_bytes(encode_package(good))
    labels = list(good.manifest.labels)
    (tmp / "bad.petah").write_bytes(encode_package(synthetic_package(new, "digits", PlanConfig(preset="petah"),
                                                                     len(labels), 3, labels)))
    return {"folder": tmp / "new", "fingerprint": new.fingerprint, "good": tmp / "good.petah",
            "bad": tmp / "bad.petah", "golden": golden_digits(tmp / "golden", count=30)}


def test_a_new_backbone_moves_with_its_tasks_and_moves_back_together(tmp_path, pair):
    for name in ("root", "release"):
        generate_keypair(tmp_path / name)
    key = tmp_path / "release.key"
    root = tmp_path / "hub"
    trusted = init_repository(root, tmp_path / "root.key", key)
    old = demo_device_backbone()
    with running_hub(Hub(root)) as (url, _server):
        agents = [fleet_station(demo_device_backbone(), tmp_path, url, root, trusted, f"dev{i}", pair["golden"],
                                engine="device", packages=(DIGITS,)) for i in range(2)]
        try:
            def rounds(n: int = 4):
                for _ in range(n):
                    for agent in agents:
                        agent.step()

            def served() -> list[tuple[str, str]]:
                return [(a.station.backbone.fingerprint, a.station.tasks["digits"].sha256) for a in agents]

            rounds(1)  # check in on the old backbone
            settings = {"stages": [50, 100], "min_healthy": 1.0, "max_failed": 0.5}
            # a package adapted on another backbone is refused before anything is signed
            with pytest.raises(PetahError, match="adapted on backbone"):
                publish_backbone(pair["folder"], [DIGITS], old.fingerprint, url, key, **settings)
            first = publish_backbone(pair["folder"], [pair["good"]], old.fingerprint, url, key, **settings)
            assert first["tasks"] == ["digits"]
            rounds()
            new_pair = (pair["fingerprint"], sha256_file(pair["good"]))
            assert served() == [new_pair] * 2
            status = {r["id"]: r for r in hub_status(url)["releases"]}[first["release"]]
            assert status["state"] == "complete" and status["kind"] == "backbone"
            answers = [a.station.predict_now([("x", DIGITS_PNG())], ("digits",)) for a in agents]
            assert all(answer[0]["digits"]["label"] for answer in answers)
            events = agents[0].audit.read_text()
            assert '"gate_passed"' in events and '"promoted"' in events and "backbone" in events

            # a restart with the old -b serves the pair the release installed
            agents[1].station.stop()
            with pytest.warns(Warning, match="installed in place of"):
                station = Station(demo_device_backbone(), agents[1].station.home, agents[1].station.config)
            station.start()
            agents[1] = Agent(station)
            assert served()[1] == new_pair

            # halted: both move back to the old backbone with the task version they ran on it
            Hub(root).registry.operate(first["release"], "halt")
            rounds(2)
            assert served() == [(old.fingerprint, sha256_file(DIGITS))] * 2
            active = json.loads((agents[1].station.home / "active-backbone.json").read_text())
            assert active["current"]["fingerprint"] == old.fingerprint

            # a release whose task fails the golden-set gate: the first stage's station refuses it
            # (its gate compares the new pair with the pair it runs) and the release halts
            second = publish_backbone(pair["folder"], [pair["bad"]], old.fingerprint, url, key, **settings)
            rounds()
            status = {r["id"]: r for r in hub_status(url)["releases"]}[second["release"]]
            assert status["state"] == "halted", status
            assert any(f["event"] == "gate_rejected" and "accuracy" in f["detail"] for f in status["failures"])
            assert served() == [(old.fingerprint, sha256_file(DIGITS))] * 2

            # a release whose health window fails on a station: it moves back by itself
            Hub(root).registry.operate(first["release"], "resume")
            sick = agents[0]
            sick.probe_seconds = lambda task: None  # non-finite outputs once moved
            rounds(1)
            assert served()[0] == (old.fingerprint, sha256_file(DIGITS))
            assert '"health_rollback"' in sick.audit.read_text()

            # withdrawn by the release key: the backbone and its task leave the signed targets
            withdraw_release(first["release"], url, key)
            rounds(2)
            assert served() == [(old.fingerprint, sha256_file(DIGITS))] * 2
            listed = Hub(root).repository.latest("targets").signed.targets
            assert first["target"] not in listed and f"digits/{sha256_file(pair['good'])}.petah" not in listed
            assert '"returned"' in agents[1].audit.read_text().splitlines()[-1]
        finally:
            for agent in agents:
                agent.station.stop()


def DIGITS_PNG() -> bytes:  # noqa: N802 - one image of the golden set's kind
    import io

    from PIL import Image

    from petah.data import load_builtin

    _, val = load_builtin("digits")
    buffer = io.BytesIO()
    Image.fromarray(val.images[0].permute(1, 2, 0).numpy()).save(buffer, "PNG")
    return buffer.getvalue()


def test_the_hub_refuses_backbone_releases_that_do_not_hold_together(tmp_path, pair):
    for name in ("root", "release"):
        generate_keypair(tmp_path / name)
    root = tmp_path / "hub"
    init_repository(root, tmp_path / "root.key", tmp_path / "release.key")
    hub = Hub(root)
    old = demo_device_backbone()
    packed, packages, targets = sign_backbone_release(pair["folder"], [pair["good"]], old.fingerprint,
                                                      hub.repository.current_targets(), tmp_path / "release.key")
    with pytest.raises(PetahError, match="not the tasks the backbone's signed entry names"):
        hub.publish_backbone(packed, [], targets, {})
    with pytest.raises(PetahError, match="does not name the uploaded backbone"):
        middle = len(packed) // 2
        hub.publish_backbone(packed[:middle] + bytes([packed[middle] ^ 1]) + packed[middle + 1:], packages, targets, {})
    with pytest.raises(PetahError, match="does not name the uploaded package"):
        hub.publish_backbone(packed, [DIGITS.read_bytes()], targets, {})
    assert hub.registry.releases() == []
    result = hub.publish_backbone(packed, packages, targets, {"stages": [100]})
    assert result["tasks"] == ["digits"] and hub.registry.release(result["release"]).to_backbone == pair["fingerprint"]
    assert read_device_backbone(pair["folder"]).fingerprint == pair["fingerprint"]
