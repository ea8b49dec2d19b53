"""The hub's tables on a real PostgreSQL server (Debian's postgresql: a throwaway cluster made by
initdb and started by pg_ctl on a free port, as a non-root user), against SQLite: the same calls
leave the same fleet; two hub processes on one database, polled and reported to without sticky
sessions, promote each stage once and lose no report; migrations are numbered and an old hub.db
is brought up."""

from __future__ import annotations

import json
import random
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import CLI_ENV, free_port
from petah.bench.postgres import throwaway_cluster
from petah.errors import PetahError
from petah.fleet.client import call, hub_status, publish_release
from petah.fleet.database import MIGRATIONS, Database
from petah.fleet.metadata import init_repository
from petah.fleet.registry import Registry
from petah.packages import generate_keypair, read_package
from petah.serve import demo_packages

pytestmark = pytest.mark.server
DIGITS = next(Path(p) for p in demo_packages() if p.stem == "digits")


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of its own; yields a function making an empty database's URL."""
    try:
        with throwaway_cluster() as new_database:
            yield new_database
    except PetahError as exc:
        pytest.fail(f"{exc} (.ci/run installs it)")


def fleet_story(registry: Registry, backbone: str) -> dict:
    """One fleet's life through the registry's own calls; the status without its clock readings."""
    for i in range(12):
        registry.add_device(f"dev{i:02d}", f"token-{i:02d}-0123456789abcdef")
        registry.poll(f"dev{i:02d}", backbone, {}, "ok")
    first = registry.add_release("digits", backbone, "a" * 64, "digits/a.petah", 1000, [25, 50, 100], 1.0, 0.5, None)
    second = registry.add_release("digits", backbone, "b" * 64, "digits/b.petah", 2000, [50, 100], 1.0, 0.5, 80.0)
    for _ in range(3):
        for i in range(12):
            device = f"dev{i:02d}"
            desired = registry.poll(device, backbone, {}, "ok", {"digits": {"state": "ok", "estimated": 90.0 + i}})
            for release in desired["desired"].values():
                registry.report(device, "downloaded", release["release"], "digits", "", size=1000, retries=i % 2)
                event = "gate_rejected" if release["release"] == second.id and i % 3 == 0 else "promoted"
                registry.report(device, event, release["release"], "digits", f"detail {i}")
    registry.operate(first.id, "halt")
    status = registry.status()
    for release in status["releases"]:
        del release["created"], release["stage_times"]
        for event in release["failures"] + release["history"]:
            del event["at"]
    for device in status["devices"]:
        del device["last_seen"]
    return status


def test_postgresql_keeps_the_same_fleet_as_sqlite(tmp_path, postgres):
    backbone = read_package(DIGITS).manifest.backbone.fingerprint
    on_sqlite, on_postgres = Registry(tmp_path / "hub.db"), Registry(postgres())
    try:
        expected = fleet_story(on_sqlite, backbone)
        assert expected["releases"][1]["failures"] and expected["releases"][0]["state"] == "halted"
        assert fleet_story(on_postgres, backbone) == expected
        assert on_postgres.db.version == on_sqlite.db.version == len(MIGRATIONS)
    finally:
        on_sqlite.close()
        on_postgres.close()
    with pytest.raises(PetahError, match="--db: cannot connect to the database"):
        Database(f"postgresql://petah@127.0.0.1:{free_port()}/none")


def hub_process(root: Path, db: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "petah", "hub", "serve", "--root", str(root), "--db", db,
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    line = proc.stdout.readline()
    found = re.search(r"on (http://\S+)/", line)
    if not found:
        proc.kill()
        pytest.fail(f"the hub did not start: {line} {proc.stderr.read()[-2000:]}")
    return proc, found.group(1)


def test_two_hub_processes_on_one_database_promote_each_stage_once(tmp_path, postgres):
    """24 stations poll and report through two hub processes at random (no sticky sessions), each
    stage's stations reporting at once: the three stages advance once each (a watcher sees the stage
    never step back and no stage's time rewritten), and every report is kept."""
    for name in ("root", "release"):
        generate_keypair(tmp_path / name)
    root, db = tmp_path / "hub", postgres()
    init_repository(root, tmp_path / "root.key", tmp_path / "release.key")
    registry = Registry(db)
    devices = [f"st{i:02d}" for i in range(24)]
    for device in devices:
        registry.add_device(device, f"{device}-token-0123456789abcdef")
    hubs = [hub_process(root, db) for _ in range(2)]
    urls = [url for _proc, url in hubs]
    backbone = read_package(DIGITS).manifest.backbone.fingerprint
    try:
        release = publish_release(DIGITS, urls[0], tmp_path / "release.key", stages=[10, 50, 100],
                                  min_healthy=1.0, max_failed=0.5)["release"]
        errors: list[str] = []
        seen: list[tuple[int, list]] = []
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for hub in urls:
                    found = hub_status(hub)["releases"][0]
                    seen.append((found["stage"] + (found["state"] == "complete"), found["stage_times"]))
                time.sleep(0.01)

        def station(device: str) -> None:
            rng = random.Random(device)
            headers = {"Authorization": f"Bearer {device}-token-0123456789abcdef", "Content-Type": "application/json"}
            reported, deadline = False, time.monotonic() + 60
            try:
                while time.monotonic() < deadline:
                    hub = rng.choice(urls)
                    answer = json.loads(call(f"{hub}/v1/devices/{device}/poll", "POST",
                                             json.dumps({"backbone": backbone, "state": "ok"}).encode(), headers))
                    if "digits" in answer["desired"] and not reported:
                        time.sleep(0.2 - time.monotonic() % 0.2)  # a stage's stations report together
                        body = {"event": "promoted", "release": release, "task": "digits"}
                        call(f"{rng.choice(urls)}/v1/devices/{device}/report", "POST", json.dumps(body).encode(),
                             headers)
                        reported = True
                    if reported and hub_status(rng.choice(urls))["releases"][0]["state"] == "complete":
                        return
                    time.sleep(0.05)
                errors.append(f"{device}: the release did not complete")
            except PetahError as exc:
                errors.append(f"{device}: {exc}")

        threads = [threading.Thread(target=station, args=(device,)) for device in devices]
        watcher = threading.Thread(target=watch)
        for thread in [*threads, watcher]:
            thread.start()
        for thread in threads:
            thread.join(90)
        done.set()
        watcher.join(10)
        assert errors == []
        for (stage, times), (next_stage, next_times) in zip(seen, seen[1:], strict=False):
            assert next_stage >= stage and next_times[:len(times)] == times, (stage, times, next_stage, next_times)
        status = hub_status(urls[1])["releases"][0]
        assert status["state"] == "complete" and len(status["stage_times"]) == 3
        history = [(h["stage"], h["state"]) for h in status["history"]]
        assert history == [(1, "rolling"), (2, "rolling"), (2, "complete")], history  # each stage advanced once
        assert registry.db.one("SELECT COUNT(*) AS n FROM reports WHERE event='promoted'")["n"] == 24
        assert registry.db.one("SELECT COUNT(*) AS n FROM outcomes")["n"] == 24
    finally:
        registry.close()
        for proc, _url in hubs:
            proc.terminate()
            proc.wait(20)


def test_migrations_bring_an_old_hub_db_up_and_refuse_a_newer_one(tmp_path):
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:  # a hub.db from before drift reports and versioned migrations
        db.execute("CREATE TABLE devices (id TEXT PRIMARY KEY, token_sha256 TEXT NOT NULL, backbone TEXT, "
                   "last_seen REAL, state TEXT, installed TEXT NOT NULL DEFAULT '{}')")
        db.execute("INSERT INTO devices (id, token_sha256) VALUES ('kept', 'x')")
    registry = Registry(old)
    assert registry.db.version == len(MIGRATIONS)
    assert [d["id"] for d in registry.devices()] == ["kept"] and registry.devices()[0]["drift"] == {}
    registry.close()
    with sqlite3.connect(old) as db:
        db.execute("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(PetahError, match="schema version 99; this petah knows up to"):
        Registry(old)


@pytest.mark.parametrize("second_writes", [True, False], ids=["writer", "reader"])
def test_hubs_on_one_database_take_turns_through_its_lock(postgres, second_writes):
    """A write transaction of one hub holds the database's lock: another hub's writer or reader
    (two connections, as two processes have) waits for it, so the rollout rules see every change."""
    url = postgres()
    first, second = Registry(url), Registry(url)
    inside, go_on, order = threading.Event(), threading.Event(), []

    def hold(_db):
        order.append("first in")
        inside.set()
        go_on.wait(10)
        order.append("first out")

    try:
        holder = threading.Thread(target=first.db.transaction, args=(hold,))
        holder.start()
        assert inside.wait(10)
        waiter = threading.Thread(target=second.db.transaction,
                                  args=(lambda _db: order.append("second"),), kwargs={"write": second_writes})
        waiter.start()
        time.sleep(0.3)
        go_on.set()
        holder.join(10)
        waiter.join(10)
        assert order == ["first in", "first out", "second"]
    finally:
        first.close()
        second.close()


def test_bench_fleet_sim_drives_hubs_to_a_complete_release_without_losses(tmp_path, postgres):
    """``petah bench fleet --sim`` in small: one hub on SQLite, one and two on PostgreSQL, 60 simulated
    stations; every answer a signed assignment, each stage advanced once, every report kept."""
    from petah.bench.fleet_sim import run_fleet_sim

    result = run_fleet_sim([60], configs=("sqlite-1", "postgresql-1", "postgresql-2"), seconds=1.0, connections=4,
                           timeout_s=60, workdir=tmp_path, new_database=postgres)
    for row in result["rows"]:
        assert row["errors"] == 0 and row["unsigned_answers"] == 0 and row["counter_not_rising"] == 0, row
        assert row["steady"]["polls"] > 0 and row["steady"]["hub_cpu_ms_per_poll"] > 0, row
        release = row["release"]
        assert release["state"] == "complete" and release["each_stage_once"] and release["no_report_lost"], row
        # complete once 90 % of the last stage promoted (min_healthy 0.9): the rest had not polled yet
        assert release["promoted"] >= 54 and release["reports_stored"] == 3 * release["promoted"], row
    assert set(result["two_hubs_vs_one"]["60"]) == {"hub_cpu_ms_per_poll", "db_transaction_ms_per_poll",
                                                    "db_server_cpu_ms_per_poll"}
