"""``petah bench fleet --sim``: real hub processes under many simulated stations — the protocol
only (poll with a device token, take the signed assignment, report downloaded / installed /
promoted), no model — on one SQLite hub, one hub on PostgreSQL and two hubs on one PostgreSQL
database behind no sticky sessions (each request goes to a hub drawn at random).

Per configuration and station count: polls/s served and poll latency (p50 / p99) in a steady phase
with no rollout, the hub processes' CPU per poll (``/proc``), the database's time per poll (the
hubs' transaction time; on PostgreSQL also the server processes' CPU), the time spent waiting for
the database's lock; then a staged release (10 / 50 / 100 %) published and driven to 100 % by the
stations' reports, with its wall time and the polls it took, and the checks that nothing was
duplicated or lost (each stage advanced once, every report acknowledged is in the database).

The load comes from one asyncio loop of this process over keep-alive HTTP/1.1 connections written
here, to keep the load generator's own CPU small beside the hubs on 2 cores (measured in each
phase as ``load_generator_cores``: 0.07–0.10 while the hubs used 0.9–1.3).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from petah.errors import PetahError
from petah.serve.metrics import quantile_ms
from petah.serve.sources import process_cpu_s

STAGES = [10, 50, 100]
CONFIGS = ("sqlite-1", "postgresql-1", "postgresql-2")  # database and hub processes


def server_pids(data_dir: Path) -> list[int]:
    """The PostgreSQL server of ``data_dir``: its postmaster and every child (the hubs' backends)."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as handle:
                    if int(handle.read().rpartition(")")[2].split()[1]) == postmaster:
                        pids.append(int(entry))
    return pids


class Connection:
    """One keep-alive HTTP/1.1 connection (requests one at a time; JSON bodies)."""

    def __init__(self, url: str):
        host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
        self.host, self.port = host, int(port)
        self.reader = self.writer = None

    async def request(self, path: str, body: bytes, token: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        try:
            self.writer.write(head.encode() + body)
            await self.writer.drain()
            status = int((await self.reader.readline()).split()[1])
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
                elif name.strip().lower() == b"connection" and b"close" in value.lower():
                    close = True
            data = await self.reader.readexactly(length)
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.close()
            raise
        if close:
            self.close()
        return status, data

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class Simulation:
    """Simulated stations polling hubs as fast as ``connections`` concurrent requests allow."""

    def __init__(self, urls: list[str], tokens: dict[str, str], backbone: str, connections: int):
        self.urls, self.tokens, self.backbone, self.connections = urls, tokens, backbone, connections
        self.installed: dict[str, dict[str, str]] = {device: {} for device in tokens}
        self.counters: dict[str, int] = dict.fromkeys(tokens, 0)  # the last assignment counter each device got
        self.counter_not_rising = 0  # answers whose counter was not above the device's last (must stay 0)
        self.busy: set[str] = set()  # devices with a request in flight: a station polls one at a time
        self.order = itertools.cycle(list(tokens))
        self.latencies: list[float] = []
        self.polls = self.errors = self.reports_acknowledged = 0
        self.unsigned = 0
        self.stop = False

    async def _worker(self, seed: int) -> None:
        rng = random.Random(seed)
        connections = [Connection(url) for url in self.urls]
        try:
            while not self.stop:
                device = next(self.order)
                if device in self.busy:
                    await asyncio.sleep(0)
                    continue
                self.busy.add(device)
                try:
                    await self._station(device, rng, connections)
                finally:
                    self.busy.discard(device)
        finally:
            for connection in connections:
                connection.close()

    async def _station(self, device: str, rng: random.Random, connections: list[Connection]) -> None:
        """One poll of ``device`` and, on a new assignment, its three reports."""
        connection = rng.choice(connections)  # no sticky sessions
        body = json.dumps({"backbone": self.backbone, "installed": self.installed[device],
                           "state": "ok"}).encode()
        started = time.perf_counter()
        try:
            status, data = await connection.request(f"/v1/devices/{device}/poll", body, self.tokens[device])
        except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
            self.errors += 1
            return
        self.latencies.append(time.perf_counter() - started)
        if status != 200:
            self.errors += 1
            return
        self.polls += 1
        answer = json.loads(data)
        if "assignment" not in answer:
            self.unsigned += 1
            return
        signed = json.loads(answer["assignment"]["signed"])
        self.counter_not_rising += signed["counter"] <= self.counters[device]
        self.counters[device] = max(self.counters[device], signed["counter"])
        for task, want in signed["desired"].items():
            if self.installed[device].get(task) != want["sha256"]:
                for event in ("downloaded", "installed", "promoted"):
                    report = json.dumps({"event": event, "release": want["release"], "task": task,
                                         "bytes": 1000 if event == "downloaded" else 0}).encode()
                    try:
                        status, _ = await rng.choice(connections).request(
                            f"/v1/devices/{device}/report", report, self.tokens[device])
                    except (OSError, IndexError, ValueError, asyncio.IncompleteReadError):
                        status = None
                    if status == 200:
                        self.reports_acknowledged += 1
                    else:
                        self.errors += 1
                self.installed[device][task] = want["sha256"]

    async def run(self, until, timeout_s: float) -> None:
        """Poll until ``until()`` (checked every 0.2 s) is true, or ``timeout_s`` passed."""
        self.stop = False
        workers = [asyncio.create_task(self._worker(i)) for i in range(self.connections)]
        deadline = time.monotonic() + timeout_s
        try:
            while not until() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
        finally:
            self.stop = True
            await asyncio.gather(*workers)


def hub_process(root: Path, director_key: Path, db: str | None) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "petah", "hub", "serve", "--root", str(root), "--port", "0",
               "--director-key", str(director_key)] + (["--db", db] if db else [])
    log = tempfile.TemporaryFile()  # a pipe nobody reads would block a hub that logs much
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    found = re.search(r"on (http://\S+)/", proc.stdout.readline())
    if not found:
        proc.kill()
        proc.wait()
        log.seek(0)
        raise PetahError(f"the hub did not start: {log.read()[-1000:].decode(errors='replace')}")
    return proc, found.group(1)


def hub_stats(url: str) -> dict:
    from petah.fleet.client import call

    return json.loads(call(f"{url}/v1/stats", "GET", None, {}))


def measure(config: str, devices: int, *, seconds: float, connections: int, timeout_s: float,
            new_database=None, workdir: Path) -> dict:
    from petah.fleet.client import publish_release
    from petah.fleet.metadata import init_repository
    from petah.fleet.registry import Registry
    from petah.packages import generate_keypair, read_package
    from petah.serve import demo_packages

    dialect, hubs = config.split("-")
    package = next(Path(p) for p in demo_packages() if p.stem == "digits")
    backbone = read_package(package).manifest.backbone.fingerprint
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        for name in ("root", "release", "director"):
            generate_keypair(tmp / name)
        init_repository(tmp / "hub", tmp / "root.key", tmp / "release.key", tmp / "director.pub")
        db = new_database() if dialect == "postgresql" else None
        tokens = {f"sim-{i:05d}": f"token-{i:05d}-{os.urandom(8).hex()}" for i in range(devices)}
        registry = Registry(db or tmp / "hub" / "hub.db")
        registry.add_devices(list(tokens.items()))
        processes = [hub_process(tmp / "hub", tmp / "director.key", db) for _ in range(int(hubs))]
        urls = [url for _proc, url in processes]
        server = server_pids(new_database.data_dir) if dialect == "postgresql" else []
        sim = Simulation(urls, tokens, backbone, connections)
        try:
            checked_in = asyncio.run(_check_in(sim, devices, timeout_s))
            if sim.polls < devices:
                raise PetahError(f"{config}: {devices - sim.polls} stations got no answer within {timeout_s:g} s "
                                 f"({sim.errors} errors)")
            before = _sample(processes, server, urls)
            sim.latencies, sim.polls = [], 0
            deadline = time.monotonic() + seconds
            asyncio.run(sim.run(lambda: time.monotonic() >= deadline, seconds + 10))
            after = _sample(processes, server, urls)
            steady = _phase(sim, before, after, dialect)

            release = publish_release(package, urls[0], tmp / "release.key", stages=STAGES, min_healthy=0.9,
                                      max_failed=0.2)["release"]
            sim.latencies, sim.polls, sim.reports_acknowledged = [], 0, 0
            before, started = _sample(processes, server, urls), time.monotonic()
            asyncio.run(sim.run(lambda: registry.release(release).state != "rolling", timeout_s))
            rollout_s = time.monotonic() - started
            after = _sample(processes, server, urls)
            rollout = _phase(sim, before, after, dialect)
            state = registry.release(release).state
            history = [(h["stage"], h["state"]) for h in registry.stage_history(release)]
            stored = registry.db.one("SELECT COUNT(*) AS n FROM reports WHERE release=?", (release,))["n"]
            promoted = registry.db.one("SELECT COUNT(*) AS n FROM outcomes WHERE release=? AND outcome='promoted'",
                                       (release,))["n"]
        finally:
            for proc, _url in processes:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                if proc.poll() is None:
                    proc.kill()
            registry.close()
    return {"config": config, "devices": devices, "hubs": int(hubs), "database": dialect,
            "check_in_s": checked_in, "steady": steady,
            "release": {"state": state, "seconds_to_100": round(rollout_s, 1), "history": history,
                        "each_stage_once": history == [(1, "rolling"), (2, "rolling"), (2, "complete")],
                        "reports_acknowledged": sim.reports_acknowledged, "reports_stored": stored,
                        "no_report_lost": stored == sim.reports_acknowledged, "promoted": promoted, **rollout},
            "errors": sim.errors, "unsigned_answers": sim.unsigned, "counter_not_rising": sim.counter_not_rising}


async def _check_in(sim: Simulation, devices: int, timeout_s: float) -> float:
    """Every station polls once (the hub learns its backbone); returns the seconds it took."""
    started = time.monotonic()
    await sim.run(lambda: sim.polls >= devices, timeout_s)
    return round(time.monotonic() - started, 1)


def _sample(processes, server: list[int], urls: list[str]) -> dict:
    stats = [hub_stats(url) for url in urls]
    return {"at": time.monotonic(), "hub_cpu": sum(process_cpu_s(p.pid) for p, _ in processes),
            "db_cpu": sum(process_cpu_s(pid) for pid in server),  # 0 for a backend that ended meanwhile
            "self_cpu": sum(os.times()[:2]),
            "polls": sum(s["polls"] for s in stats), "db_s": sum(s["seconds"] for s in stats),
            "lock_wait_s": sum(s["lock_wait_s"] for s in stats), "transactions": sum(s["transactions"] for s in stats)}


def _phase(sim: Simulation, before: dict, after: dict, dialect: str) -> dict:
    polls = max(1, after["polls"] - before["polls"])
    wall = after["at"] - before["at"]
    per_poll_ms = {key: round(1000 * (after[key] - before[key]) / polls, 3)
                   for key in ("hub_cpu", "db_s", "lock_wait_s")}
    result = {"polls": after["polls"] - before["polls"], "polls_per_s": round(polls / wall, 1),
              "latency_ms_p50": round(1000 * statistics.median(sim.latencies), 2) if sim.latencies else None,
              "latency_ms_p99": quantile_ms(sorted(sim.latencies), 0.99),
              "hub_cpu_ms_per_poll": per_poll_ms["hub_cpu"], "db_transaction_ms_per_poll": per_poll_ms["db_s"],
              "lock_wait_ms_per_poll": per_poll_ms["lock_wait_s"],
              "transactions": after["transactions"] - before["transactions"],
              "hub_cores": round((after["hub_cpu"] - before["hub_cpu"]) / wall, 2),
              "load_generator_cores": round((after["self_cpu"] - before["self_cpu"]) / wall, 2)}
    if dialect == "postgresql":
        result["db_server_cpu_ms_per_poll"] = round(1000 * (after["db_cpu"] - before["db_cpu"]) / polls, 3)
        result["db_server_cores"] = round((after["db_cpu"] - before["db_cpu"]) / wall, 2)
    return result


def run_fleet_sim(devices: list[int], *, configs: tuple[str, ...] = CONFIGS, seconds: float = 20.0,
                  connections: int = 8, timeout_s: float = 300.0, workdir: str | Path | None = None,
                  new_database=None) -> dict:
    """``new_database``: a function making an empty PostgreSQL database's URL (default: a throwaway
    cluster of its own, started when a configuration needs one)."""
    from petah.bench.postgres import throwaway_cluster

    for config in configs:
        if config not in CONFIGS:
            raise PetahError(f"unknown configuration {config!r} (one of {', '.join(CONFIGS)})")
    if connections < 1 or seconds <= 0 or timeout_s <= 0:
        raise PetahError("--connections must be at least 1, --seconds and --timeout-s positive")
    rows = []
    started = time.time()
    with contextlib.ExitStack() as stack:
        if new_database is None and any(c.startswith("postgresql") for c in configs):
            new_database = stack.enter_context(throwaway_cluster())
        for count in devices:
            for config in configs:
                rows.append(measure(config, count, seconds=seconds, connections=connections, timeout_s=timeout_s,
                                    new_database=new_database, workdir=Path(workdir) if workdir else None))
    return {"rows": rows, "wall_s": round(time.time() - started, 1),
            "settings": {"devices": devices, "configs": list(configs), "seconds": seconds,
                         "connections": connections, "stages": STAGES, "cpus": os.cpu_count()},
            "two_hubs_vs_one": _ratios(rows)}


def _ratios(rows: list[dict]) -> dict:
    """Per station count: two hubs on PostgreSQL against one, per poll (the ≤ 1.2x target)."""
    ratios = {}
    for count in sorted({r["devices"] for r in rows}):
        one = next((r for r in rows if r["devices"] == count and r["config"] == "postgresql-1"), None)
        two = next((r for r in rows if r["devices"] == count and r["config"] == "postgresql-2"), None)
        if one and two:
            ratios[str(count)] = {key: round(two["steady"][key] / one["steady"][key], 2)
                                  for key in ("hub_cpu_ms_per_poll", "db_transaction_ms_per_poll",
                                              "db_server_cpu_ms_per_poll") if one["steady"][key]}
    return ratios


__all__ = ["CONFIGS", "run_fleet_sim"]
