"""``petah bench soak``: a real station process run for a while under steady load, watched for what
grows: the numbers a station must keep flat for weeks, one run.

The station (the demo's device backbone and tasks, the device engine, capture on, an admin token)
serves ``clients`` threads of this process sending one 64 px image per request for every task; an
admin thread hot-swaps a task between two versions every ``swap_s`` seconds and rolls it back every
other time. The station is also managed by a hub (in this process, signed metadata): every
``release_s`` seconds a signed release of the digits task is published (the station gates it on a
small golden set and installs it) or withdrawn (the station returns to its previous version); a
release step the station has not followed when the next one is due counts as not followed.
Every ``sample_s`` seconds: the station's proportional set size (``/proc/PID/
smaps_rollup``), open file descriptors, threads, the bytes of its state folder, capture folder and
logs, and the interval's p99 latency. Phase 1 runs without restarts; the memory slope is fitted
after a warm-up (a quarter of the phase) with its 95 % interval. Phase 2 adds a ``kill -9`` and a
restart every ``restart_s`` seconds; clients retry refused connections, and a request that fails
while the station is up counts as failed. Slopes per hour are extrapolations, and say so.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from petah.errors import PetahError
from petah.http import free_port
from petah.serve.client import StationClient

ADMIN_TOKEN = "soak-admin-token-0123456789abcdef"
WARMUP_FRACTION = 0.25


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def process_numbers(pid: int) -> dict:
    """PSS (bytes), open file descriptors and threads of a live process (Linux /proc)."""
    pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    with open(f"/proc/{pid}/status") as handle:
        threads = next(int(line.split()[1]) for line in handle if line.startswith("Threads:"))
    return {"pss_bytes": pss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def slope_per_hour(times: list[float], values: list[float]) -> dict:
    """Least-squares slope of ``values`` over ``times`` (seconds), per hour, with its 95 % interval."""
    t, y = np.asarray(times, float), np.asarray(values, float)
    if len(t) < 3 or np.ptp(t) == 0:
        return {"per_hour": None, "low": None, "high": None, "samples": len(t)}
    slope, intercept = np.polyfit(t, y, 1)
    residual = y - (slope * t + intercept)
    spread = math.sqrt(float(np.sum(residual ** 2)) / (len(t) - 2)) / math.sqrt(float(np.sum((t - t.mean()) ** 2)))
    student = {3: 12.71, 4: 4.30, 5: 3.18, 6: 2.78, 7: 2.57, 8: 2.45, 9: 2.36, 10: 2.31}  # t(0.975, n - 2)
    z = 1.96 if len(t) > 30 else student.get(len(t), 2.2)
    return {"per_hour": slope * 3600, "low": (slope - z * spread) * 3600, "high": (slope + z * spread) * 3600,
            "samples": len(t)}


class SoakStation:
    """The station process, restartable (and killable) on one fixed port."""

    def __init__(self, root: Path, python: str, args: list[str]):
        self.root, self.python, self.args = root, python, args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.up = threading.Event()
        self.starts: list[float] = []

    def start(self, timeout: float = 120.0) -> float:
        began = time.perf_counter()
        log = open(self.root / "station.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([self.python, "-m", "petah", "serve", *self.args, "--port", str(self.port)],
                                     stdout=log, stderr=log)
        log.close()
        client = StationClient(self.url, timeout=5)
        while time.perf_counter() - began < timeout:
            if self.proc.poll() is not None:
                raise PetahError(f"bench soak: the station exited ({self.proc.returncode}); "
                                 f"see {self.root}/station.log")
            try:
                if client.request("GET", "/healthz").status == 200:
                    self.up.set()
                    seconds = time.perf_counter() - began
                    self.starts.append(seconds)
                    return seconds
            except OSError:
                time.sleep(0.1)
        raise PetahError("bench soak: the station did not start")

    def kill(self) -> None:
        self.up.clear()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        self.up.clear()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _golden_set(folder: Path, task: str, classes: tuple[str, ...] = ("3", "7"), per_class: int = 4) -> None:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        (folder / task / label).mkdir(parents=True)
        for i in range(per_class):
            buffer = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(buffer, format="PNG")
            (folder / task / label / f"{i}.png").write_bytes(buffer.getvalue())


class HubReleases:
    """A hub whose release key publishes and withdraws signed versions of one task in turn."""

    def __init__(self, root: Path, package: Path, variants: int = 2):
        from petah.fleet.hub import add_device
        from petah.fleet.metadata import init_repository
        from petah.packages import generate_keypair, sign_package

        for name in ("root", "release", *[f"packager{i}" for i in range(variants)]):
            generate_keypair(root / name)
        self.root, self.key = root / "hub", root / "release.key"
        self.trusted = init_repository(self.root, root / "root.key", self.key)
        add_device(self.root, "soak-1", root / "soak-1.token")
        _golden_set(root / "golden", package.stem)
        self.variants = []  # same answers, other bytes (each signed by its own packager key)
        for i in range(variants):
            copy = root / f"{package.stem}-{i}.petah"
            copy.write_bytes(package.read_bytes())
            sign_package(copy, root / f"packager{i}.key")
            self.variants.append(copy)
        self.station_options = ["--trust-root", str(self.trusted), "--device-id", "soak-1", "--device-token-file",
                                str(root / "soak-1.token"), "--golden", str(root / "golden"), "--poll-s", "1",
                                "--health-window-s", "1", "--allow-manual"]
        self.release: int | None = None
        self.turn = 0
        self.expected: str | None = None  # the version the station should run after the last step

    def step(self, url: str, base_version: str) -> None:
        from petah.bench.fleet import sha256_file
        from petah.fleet.client import publish_release, withdraw_release

        if self.release is None:
            package = self.variants[self.turn % len(self.variants)]
            self.release = publish_release(package, url, self.key, stages=[100], min_healthy=1.0,
                                           max_failed=0.5)["release"]
            self.expected = sha256_file(package)[:12]
        else:
            withdraw_release(self.release, url, self.key)
            self.release, self.expected = None, base_version
            self.turn += 1


def run_soak(minutes: float = 30.0, restart_minutes: float = 10.0, restart_s: float = 180.0, clients: int = 4,
             swap_s: float = 20.0, sample_s: float = 10.0, device_python: str | None = None,
             request_interval_s: float = 0.05, release_s: float | None = 60.0) -> dict:
    """Phase 1 for ``minutes`` without restarts, then phase 2 for ``restart_minutes`` with a
    ``kill -9`` and restart every ``restart_s`` seconds (see the module's docstring)."""
    import shutil

    from petah.bench.fleet import sha256_file
    from petah.bench.serve import bench_images
    from petah.device.bundle import WEIGHTS_FILE
    from petah.fleet.hub import Hub
    from petah.fleet.hub_app import running_hub
    from petah.serve import demo_device_files, demo_packages

    images = bench_images()
    packages = {p.stem: p for p in demo_packages()}
    flip = [packages["digits"].read_bytes(), packages["textures"].read_bytes()]
    with tempfile.TemporaryDirectory(prefix="petah-bench-soak-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        releases = HubReleases(root, packages["digits"]) if release_s else None
        hub_url = stack.enter_context(running_hub(Hub(releases.root)))[0] if releases else None
        source, weights = demo_device_files()
        shutil.copytree(source, root / "backbone")
        shutil.copy(weights, root / "backbone" / WEIGHTS_FILE)
        (root / "admin").write_text(ADMIN_TOKEN)
        args = ["-b", str(root / "backbone"), "--engine", "device", "--threads", "1", "--state-dir",
                str(root / "state"), "--admin-token-file", str(root / "admin"), "--capture-dir", str(root / "capture"),
                "--capture-max-mb", "32", "--capture-random", "0.02",
                *[arg for p in ("digits", "textures", "defects", "digit-boxes") for arg in ("-p", str(packages[p]))]]
        if releases:
            args += ["--hub", hub_url, *releases.station_options]
        station = SoakStation(root, device_python or sys.executable, args)
        station.start()
        for data in flip:  # two versions of task "flip": a rollback always has one to go back to
            reply = StationClient(station.url, timeout=60).install("flip", data, ADMIN_TOKEN)
            if reply.status != 200:
                raise PetahError(f"bench soak: installing the task it swaps failed: {reply.status} {reply.body[:300]}")
        stop = threading.Event()
        lock = threading.Lock()
        latencies: list[tuple[float, float]] = []  # (finished at, seconds)
        counts = {"requests": 0, "failed": 0, "refused_while_down": 0, "swaps": 0, "rollbacks": 0,
                  "admin_failed": 0, "release_steps": 0, "release_steps_followed": 0}
        digits_demo = sha256_file(packages["digits"])[:12]
        started = time.monotonic()

        def client(i: int) -> None:
            own = StationClient(station.url, timeout=30)
            k = i
            while not stop.is_set():
                if not station.up.is_set():
                    station.up.wait(1.0)
                    continue
                began = time.perf_counter()
                try:
                    reply = own.predict([(f"{k}.png", images[k % len(images)])])
                    ok = reply.status == 200
                except OSError:
                    ok = None  # connection refused or reset: the station is (being) killed
                with lock:
                    if ok:
                        counts["requests"] += 1
                        latencies.append((time.monotonic() - started, time.perf_counter() - began))
                    elif ok is None and not station.up.is_set():
                        counts["refused_while_down"] += 1
                    else:
                        counts["failed"] += 1
                k += 1
                time.sleep(request_interval_s)

        def admin() -> None:
            own = StationClient(station.url, timeout=60)
            turn = 0
            while not stop.wait(swap_s):
                if not station.up.is_set():
                    continue
                try:
                    if turn % 2:
                        reply = own.rollback("flip", ADMIN_TOKEN)
                        counts["rollbacks"] += reply.status == 200
                    else:
                        reply = own.install("flip", flip[(turn // 2) % 2], ADMIN_TOKEN)
                        counts["swaps"] += reply.status == 200
                    if reply.status != 200:
                        counts["admin_failed"] += 1
                        admin_errors.append(f"{reply.status}: {reply.body[:200].decode(errors='replace')}")
                except OSError:
                    pass  # killed meanwhile
                turn += 1

        def hub_admin() -> None:
            station_client = StationClient(station.url, timeout=30)
            while not stop.wait(release_s):
                try:
                    if releases.expected is not None:
                        rows = {row["name"]: row for row in station_client.tasks()}
                        counts["release_steps_followed"] += rows.get("digits", {}).get("version") == releases.expected
                    releases.step(hub_url, digits_demo)
                    counts["release_steps"] += 1
                except (OSError, PetahError) as error:
                    admin_errors.append(f"hub: {error}")

        samples: list[dict] = []
        admin_errors: list[str] = []

        def sample(phase: int) -> None:
            now = time.monotonic() - started
            with lock:
                recent = sorted(s for at, s in latencies if at > now - sample_s)
            try:
                numbers = process_numbers(station.proc.pid)
            except (OSError, StopIteration):
                return  # between a kill and the restart
            samples.append({"t": round(now, 1), "phase": phase, **numbers,
                            "state_bytes": _folder_bytes(root / "state"),
                            "capture_bytes": _folder_bytes(root / "capture"),
                            "log_bytes": (root / "station.log").stat().st_size,
                            "p99_ms": round(1000 * recent[min(len(recent) - 1, int(0.99 * len(recent)))], 2)
                            if recent else None, "requests": len(recent)})

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        threads.append(threading.Thread(target=admin, daemon=True))
        if releases:
            threads.append(threading.Thread(target=hub_admin, daemon=True))
        for thread in threads:
            thread.start()
        try:
            phase_end = started + 60 * minutes
            while time.monotonic() < phase_end:
                time.sleep(min(sample_s, max(0.0, phase_end - time.monotonic())))
                sample(1)
            restarts = []
            phase_end = time.monotonic() + 60 * restart_minutes
            next_kill = time.monotonic() + restart_s
            while time.monotonic() < phase_end:
                time.sleep(min(sample_s, max(0.0, phase_end - time.monotonic())))
                sample(2)
                if time.monotonic() >= next_kill and time.monotonic() < phase_end:
                    station.kill()
                    restarts.append(round(station.start(), 2))
                    next_kill = time.monotonic() + restart_s
        finally:
            stop.set()
            for thread in threads:
                thread.join(60)
            station.stop()
        counts["admin_errors"] = admin_errors[-5:]
        return summarize(samples, counts, restarts, {"minutes": minutes, "restart_minutes": restart_minutes,
                                                     "restart_s": restart_s, "clients": clients, "swap_s": swap_s,
                                                     "sample_s": sample_s, "release_s": release_s})


def summarize(samples: list[dict], counts: dict, restarts: list[float], settings: dict) -> dict:
    phase1 = [s for s in samples if s["phase"] == 1]
    warm = phase1[int(len(phase1) * WARMUP_FRACTION):]
    pss = slope_per_hour([s["t"] for s in warm], [s["pss_bytes"] / 2**20 for s in warm])
    p99 = [s["p99_ms"] for s in phase1 if s["p99_ms"] is not None]
    after = [s for s in samples if s["phase"] == 2]
    return {"settings": settings, "counts": counts, "restart_seconds": restarts,
            "pss_mb_slope_per_hour": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in pss.items()},
            "pss_mb": [round(s["pss_bytes"] / 2**20, 1) for s in (warm[0], warm[-1])] if warm else None,
            "fds": [min(s["fds"] for s in warm), max(s["fds"] for s in warm)] if warm else None,
            "threads": [min(s["threads"] for s in warm), max(s["threads"] for s in warm)] if warm else None,
            "p99_ms_first_last": [p99[0], p99[-1]] if p99 else None,
            "p99_ratio_last_first": round(p99[-1] / p99[0], 2) if len(p99) > 1 and p99[0] else None,
            "end": {k: samples[-1][k] for k in ("state_bytes", "capture_bytes", "log_bytes")} if samples else None,
            "phase2_fds": [min(s["fds"] for s in after), max(s["fds"] for s in after)] if after else None,
            "samples": samples}


__all__ = ["process_numbers", "run_soak", "slope_per_hour"]
