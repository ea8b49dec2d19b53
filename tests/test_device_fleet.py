"""A station on the device install (no torch) managed by a hub: it checks in, gates a release on
its golden set with the device engine, serves it, and returns to its previous version when the
release is withdrawn. ``.ci/run`` runs this file in the device environment."""

import io
import shutil

import numpy as np
import pytest
from PIL import Image

from petah.bench.fleet import sha256_file, wait_for
from petah.fleet.client import hub_status, publish_release, withdraw_release
from petah.fleet.hub import Hub, add_device
from petah.fleet.hub_app import running_hub
from petah.fleet.metadata import init_repository
from petah.packages import generate_keypair, sign_package
from petah.serve import demo_packages
from petah.serve.client import StationClient, station_process

pytestmark = [pytest.mark.device, pytest.mark.server]
DIGITS = next(p for p in demo_packages() if p.stem == "digits")


def digits_version(station: StationClient) -> str | None:
    rows = {row["name"]: row for row in station.tasks()}
    return rows["digits"]["version"] if "digits" in rows else None


def test_a_device_station_follows_a_release_and_its_withdrawal(tmp_path):
    for name in ("root", "release", "packager"):
        generate_keypair(tmp_path / name)
    root = tmp_path / "hub"
    trusted = init_repository(root, tmp_path / "root.key", tmp_path / "release.key")
    add_device(root, "line-1", tmp_path / "line-1.token")
    golden = tmp_path / "golden" / "digits"
    for label in ("3", "7"):
        (golden / label).mkdir(parents=True)
        for i in range(4):
            buffer = io.BytesIO()
            Image.fromarray(np.random.default_rng(10 * int(label) + i).integers(0, 256, (64, 64, 3), np.uint8)).save(
                buffer, format="PNG")
            (golden / label / f"{i}.png").write_bytes(buffer.getvalue())
    again = tmp_path / "again.petah"  # the demo's digits signed by a packager: other bytes, same answers
    shutil.copyfile(DIGITS, again)
    sign_package(again, tmp_path / "packager.key")
    with running_hub(Hub(root)) as (url, _server):
        options = ("--hub", url, "--trust-root", str(trusted), "--device-id", "line-1", "--device-token-file",
                   str(tmp_path / "line-1.token"), "--golden", str(tmp_path / "golden"), "--poll-s", "0.2",
                   "--health-window-s", "0.2")
        with station_process("--demo", "--engine", "device", "--state-dir", str(tmp_path / "state"), "--threads", "1",
                             *options) as (_proc, station_url):
            station = StationClient(station_url)
            demo = digits_version(station)
            assert demo == sha256_file(DIGITS)[:12]
            assert wait_for(lambda: [d["id"] for d in Hub(root).registry.devices() if d["backbone"]] == ["line-1"], 30)
            release = publish_release(again, url, tmp_path / "release.key", stages=[100], min_healthy=1.0,
                                      max_failed=0.5)
            assert wait_for(lambda: digits_version(station) == sha256_file(again)[:12], 60)
            assert wait_for(lambda: {r["id"]: r for r in hub_status(url)["releases"]}[release["release"]]["state"]
                            == "complete", 30)
            withdraw_release(release["release"], url, tmp_path / "release.key")
            assert wait_for(lambda: digits_version(station) == demo, 60)
