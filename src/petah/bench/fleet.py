"""``petah bench fleet``: one hub and N station agents on 127.0.0.1 under injected faults.

N-1 stations run in this process (each its own Station, engine, state dir and agent thread); one
is a real ``petah serve --hub`` child process, killed with SIGKILL while it installs a release
and started again. The hub drops connections, truncates and corrupts downloads, delays answers
and goes down for a while. Three releases of the demo digits task go out in stages: a good one,
a bad one (random adapters: near chance on the golden set), another good one. The JSON reports
per release the time to each stage and to 100 %, retries, bytes moved per station versus
shipping the whole model, and the outcomes as booleans (a contract: scripts read them).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

from petah.errors import PetahError
from petah.files import DiskQueue
from petah.fleet.registry import FAILED_EVENTS
from petah.http import free_port
from petah.serve.state import sha256_bytes

OUTCOMES = ("all_consistent", "bad_release_halted_in_first_stage", "no_bad_package_served", "no_state_lost")


def golden_digits(root: Path, count: int = 60) -> Path:
    """GOLDEN/digits/: ``count`` held-out digits (scikit-learn's, offline) as class folders of PNGs."""
    from PIL import Image

    from petah.data import load_builtin

    _, val = load_builtin("digits")
    for i in range(min(count, len(val))):
        folder = root / "digits" / val.classes[int(val.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(val.images[i].permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def digits_versions(folder: Path, backbone) -> dict[str, Path]:
    """Versions of the demo digits task: ``good`` (the demo package), ``again`` (the same, signed:
    other bytes, same quality), ``bad`` (random adapters and head) and ``foreign`` (trained for
    another backbone fingerprint)."""
    import torch

    from petah.backbones.factory import fingerprint
    from petah.packages import encode_package, generate_keypair, read_package, sign_package
    from petah.plans import PlanConfig
    from petah.serve import demo_packages
    from petah.testing import synthetic_package

    digits = next(p for p in demo_packages() if p.stem == "digits")
    labels = list(read_package(digits).manifest.labels)
    paths = {name: folder / f"{name}.petah" for name in ("good", "again", "bad", "foreign")}
    shutil.copyfile(digits, paths["good"])
    shutil.copyfile(digits, paths["again"])
    generate_keypair(folder / "packager")
    sign_package(paths["again"], folder / "packager.key")
    plan = PlanConfig(preset="petah")
    paths["bad"].write_bytes(encode_package(synthetic_package(backbone, "digits", plan, len(labels), 3, labels)))
    other_model = copy.deepcopy(backbone.model)
    with torch.no_grad():
        next(other_model.parameters()).add_(0.01)
    other = replace(backbone, model=other_model, fingerprint=fingerprint(other_model))
    paths["foreign"].write_bytes(encode_package(synthetic_package(other, "digits", plan, len(labels), 0, labels)))
    return paths


def sha256_file(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


class ChildStation:
    """The one station that runs as its own process (killed and restarted by the bench)."""

    def __init__(self, args: list[str]):
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "petah", "serve", *self.args, "--port", "0"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_for(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def audit_events(state: Path) -> list[dict]:
    path = state / "audit.jsonl"
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:  # a line cut by SIGKILL: JSON lines lose at most that line
            continue
    return events


def check_state(state: Path, fingerprint: str) -> tuple[bool, dict[str, str]]:
    """A state dir as a restart would read it: (intact, task -> sha256). Intact: station.json
    parses, names this backbone, every package it names exists under its own hash, no temp file."""
    from petah.serve.state import read_entries

    try:
        entries = read_entries(state / "station.json", fingerprint)  # reads only: stations may be running
    except PetahError:
        return False, {}
    leftovers = list(state.glob(".*.tmp")) + list((state / "packages").glob(".*.tmp"))
    for entry in entries.values():
        for sha in filter(None, (entry.sha256, entry.previous)):
            path = state / "packages" / f"{sha}.petah"
            if not path.is_file() or sha256_file(path) != sha:
                return False, {}
    return not leftovers, {name: entry.sha256 for name, entry in entries.items()}


def post_image(url: str, image: bytes) -> None:
    from petah.fleet.client import call

    call(url, "POST", image, {"Content-Type": "image/png"}, timeout=15)


class RequestLoad:
    """Each station's own traffic while it updates: a thread per station sending the probe image
    to its task back to back, ``pause_s`` apart (in-process stations through ``predict_now``, the
    child station over HTTP, which fails while it is killed)."""

    def __init__(self, pause_s: float):
        self.pause_s = pause_s
        self.requests = self.errors = 0
        self.error_kinds: dict[str, int] = {}  # the first words of each kind of failure, counted
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self, send) -> None:
        while not self._stop.is_set():
            kind = None
            try:
                send()
            except Exception as exc:  # a station restarting, no task yet: counted by kind, the load goes on
                kind = f"{type(exc).__name__}: {' '.join(str(exc).split()[:6])}"[:120]
            with self._lock:
                self.requests += kind is None
                self.errors += kind is not None
                if kind is not None:
                    self.error_kinds[kind] = self.error_kinds.get(kind, 0) + 1
            self._stop.wait(self.pause_s)

    def add(self, send) -> None:
        thread = threading.Thread(target=self._run, args=(send,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> dict:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        top = dict(sorted(self.error_kinds.items(), key=lambda item: -item[1])[:5])
        return {"pause_s": self.pause_s, "requests": self.requests, "errors": self.errors, "error_kinds": top}


@contextlib.contextmanager
def cpu_hogs(count: int):
    """``count`` processes spinning on the CPU (another job on the device) while the block runs."""
    # each spins until its parent (this process) is gone, so a killed bench leaves none behind
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(100000): pass"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def run_fleet_bench(devices: int = 20, *, poll_s: float = 0.5, health_window_s: float = 1.0,
                    timeout_s: float = 240.0, faults: dict | None = None, hub_down_s: float = 4.0,
                    workdir: str | Path | None = None, load_pause_s: float | None = None, hogs: int = 0) -> dict:
    """``load_pause_s``: every station serves its own requests, this far apart, all along;
    ``hogs``: processes spinning on the CPU beside the fleet."""
    with cpu_hogs(hogs):
        result = _run_fleet_bench(devices, poll_s, health_window_s, timeout_s, faults, hub_down_s, workdir,
                                  load_pause_s)
    result["settings"]["hogs"] = hogs
    return result


def _run_fleet_bench(devices: int, poll_s: float, health_window_s: float, timeout_s: float, faults: dict | None,
                     hub_down_s: float, workdir: str | Path | None, load_pause_s: float | None) -> dict:
    from petah.backbones import create_backbone, demo_backbone_path
    from petah.bench.faults import Faults
    from petah.fleet.agent import Agent, probe_image
    from petah.fleet.client import hub_status, publish_release
    from petah.fleet.hub import Hub, add_device
    from petah.fleet.hub_app import running_hub
    from petah.fleet.metadata import init_repository
    from petah.packages import generate_keypair
    from petah.serve import ServeConfig, Station

    if devices < 3:
        raise PetahError("--devices must be at least 3 (one killed child station, two in-process)")
    started = time.time()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        backbone_path = demo_backbone_path()
        backbone = create_backbone(weights=str(backbone_path))
        for name in ("root", "release", "director"):
            generate_keypair(tmp / name)
        # with a director: every poll answer a signed assignment the stations check
        trusted = init_repository(tmp / "hub", tmp / "root.key", tmp / "release.key", tmp / "director.pub")
        golden = golden_digits(tmp / "golden")
        versions = digits_versions(tmp, backbone)
        fault_plan = Faults(**{"drop": 0.08, "truncate": 0.05, "corrupt": 0.05, "delay": 0.03, "delay_s": 2.0,
                               **(faults or {})})
        hub = Hub(tmp / "hub", director_key=tmp / "director.key")
        # the child station first in rollout order (the stable hash): it is in every first stage,
        # so it is installing when it is killed
        from petah.fleet.registry import stage_rank

        ids = sorted((f"station-{i:03d}" for i in range(devices)), key=stage_rank)
        for device in ids:
            add_device(tmp / "hub", device, tmp / f"{device}.token")
        settings = {"stages": [10, 50, 100], "min_healthy": 0.9, "max_failed": 0.2}
        agents: list[Agent] = []
        # the dropped connections are the point here: uvicorn's tracebacks about them are not news
        with running_hub(hub, middleware=[fault_plan.middleware()], log_level="critical") as (url, _server):
            common = dict(hub=url, trust_root=str(trusted), golden=str(golden), poll_s=poll_s,
                          health_window_s=health_window_s, engine="torch", threads=1)
            child_port = free_port()
            child = ChildStation(["-b", str(backbone_path), "--state-dir", str(tmp / f"state-{ids[0]}"),
                                  "--port", str(child_port),
                                  "--hub", url, "--trust-root", str(trusted), "--device-id", ids[0],
                                  "--device-token-file", str(tmp / f"{ids[0]}.token"), "--golden", str(golden),
                                  "--poll-s", str(poll_s), "--health-window-s", str(health_window_s),
                                  "--engine", "torch", "--threads", "1"])
            child.start()
            load = RequestLoad(load_pause_s) if load_pause_s is not None else None
            try:
                for device in ids[1:]:
                    station = Station(backbone, tmp / f"state-{device}",
                                      ServeConfig(**common, device_id=device,
                                                  device_token_file=str(tmp / f"{device}.token")))
                    station.start()
                    agent = Agent(station)
                    agents.append(agent)
                    agent.start()
                    if load is not None:
                        load.add(functools.partial(station.predict_now, [("load", probe_image())], ("digits",)))
                if load is not None:
                    load.add(functools.partial(post_image, f"http://127.0.0.1:{child_port}/v1/predict?tasks=digits",
                                               probe_image()))
                wait_for(lambda: sum(d["backbone"] is not None for d in hub.registry.devices()) == devices, 60)

                def settle(release: int) -> str:
                    wait_for(lambda: hub.registry.release(release).state in ("complete", "halted"), timeout_s, 0.5)
                    return hub.registry.release(release).state

                timeline = {}
                first = publish_release(versions["good"], url, tmp / "release.key", **settings)["release"]
                timeline["good"] = (first, settle(first))
                bad = publish_release(versions["bad"], url, tmp / "release.key", **settings)["release"]
                timeline["bad"] = (bad, settle(bad))
                second = publish_release(versions["again"], url, tmp / "release.key", **settings)["release"]

                def kill_child_mid_install() -> dict:
                    state = tmp / f"state-{ids[0]}"
                    def installed() -> bool:  # in the state dir, health window running, not yet promoted
                        return any(e["event"] == "installed" and e["release"] == second for e in audit_events(state))

                    wait_for(lambda: installed() or hub.registry.release(second).state != "rolling", timeout_s, 0.02)
                    seen = installed()
                    child.kill()
                    time.sleep(0.5)
                    child.start()
                    return {"killed_after": "installed" if seen else "the release settled first"}

                def hub_outage() -> None:
                    time.sleep(1.0)
                    fault_plan.down = True
                    time.sleep(hub_down_s)
                    fault_plan.down = False

                kill_info: dict = {}
                threads = [threading.Thread(target=lambda: kill_info.update(kill_child_mid_install())),
                           threading.Thread(target=hub_outage)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                timeline["again"] = (second, settle(second))
                # the last stations finish their health windows and report
                wait_for(lambda: all(check_state(tmp / f"state-{d}", backbone.fingerprint)[1].get("digits")
                                     == sha256_file(versions["again"]) for d in ids), 60, 0.5)
                # and every station's queued reports reached the hub (the byte counts come from them)
                wait_for(lambda: all(DiskQueue.backlog_of(tmp / f"state-{d}" / "agent" / "outbox") == 0 for d in ids),
                         30, 0.2)
                status = hub_status(url)
            finally:
                load_numbers = load.stop() if load is not None else None
                for agent in agents:
                    agent.stop()
                    agent.station.stop()
                child.stop()
        result = summarize(tmp, ids, backbone, versions, timeline, status, fault_plan, kill_info)
        result["request_load"] = load_numbers
    result["wall_s"] = round(time.time() - started, 1)
    result["settings"] = {"devices": devices, "poll_s": poll_s, "health_window_s": health_window_s,
                          "hub_down_s": hub_down_s, "load_pause_s": load_pause_s, **settings}
    return result


def names_its_measurement(event: str, detail: str) -> bool:
    """A gate rejection states the metric or time that failed and both versions' scores and times
    (``metric value in N ms``); a health rollback the probes' slowdown or what the probes got."""
    if event == "gate_rejected":
        return bool(re.search(r"(candidate|current) \S+ [\d.]+ in \d+ ms", detail)) and bool(
            re.match(r"(\S+ [\d.]+ (vs|is below)|[\d.]+x the current version's time|\S+ is not a number)", detail))
    return bool(re.match(r"(probes took [\d.]+x as long|non-finite outputs|probe failed: )", detail))


def summarize(tmp: Path, ids: list[str], backbone, versions: dict[str, Path], timeline: dict, status: dict,
              faults, kill_info: dict) -> dict:
    by_id = {r["id"]: r for r in status["releases"]}
    final, allowed = sha256_file(versions["again"]), {sha256_file(versions[k]) for k in ("good", "again")}
    bad_sha = sha256_file(versions["bad"])
    whole_model = backbone.weights_bytes + versions["good"].stat().st_size
    releases = {}
    for name, (release_id, state) in timeline.items():
        row = by_id[release_id]
        transfer = row["transfer"]
        releases[name] = {
            "release": release_id, "state": state, "stage_reached": row["stages"][row["stage"]],
            # stage_times: when each later stage opened, then (complete) when the last stage was healthy
            "seconds_to_stage": {f"{pct}%": round(t - row["created"], 2)
                                 for pct, t in zip(row["stages"][1:], row["stage_times"], strict=False)},
            "seconds_to_100": (round(row["stage_times"][-1] - row["created"], 2) if state == "complete" else None),
            "retries": transfer["retries"], "stations_downloaded": transfer["devices"],
            "bytes_per_station": round(transfer["bytes"] / max(1, transfer["devices"])),
            "whole_model_bytes": whole_model,
            "bytes_vs_whole_model": round(transfer["bytes"] / max(1, transfer["devices"]) / whole_model, 4),
            "counts": row["counts"],
            "failures": [f"{e['device']}: {e['event']}: {e['detail']}" for d in ids
                         for e in audit_events(tmp / f"state-{d}")
                         if e["release"] == release_id and e["event"] in FAILED_EVENTS]}
    states, intact, served_bad = {}, True, False
    for device in ids:
        ok, entries = check_state(tmp / f"state-{device}", backbone.fingerprint)
        intact &= ok
        states[device] = entries.get("digits")
        served_bad |= any(e["event"] == "installed" and e["release"] == timeline["bad"][0]
                          for e in audit_events(tmp / f"state-{device}"))
    bad_row = by_id[timeline["bad"][0]]
    refusals = [(e["event"], e["detail"]) for d in ids for e in audit_events(tmp / f"state-{d}")
                if e["event"] in ("gate_rejected", "health_rollback")]
    outcomes = {
        "all_consistent": all(sha == final for sha in states.values()),
        "bad_release_halted_in_first_stage": bad_row["state"] == "halted" and bad_row["stage"] == 0,
        "no_bad_package_served": not served_bad and all(s in allowed for s in states.values() if s) and
                                 bad_sha not in states.values(),
        "no_state_lost": intact,
    }
    return {"releases": releases, **outcomes, "faults_injected": dict(faults.counts), "child_station": kill_info,
            "every_refusal_names_its_measurement": all(names_its_measurement(*r) for r in refusals),
            "refusals": len(refusals),
            "final_versions": {k: (v or "none")[:12] for k, v in states.items()}}


__all__ = ["OUTCOMES", "check_state", "digits_versions", "golden_digits", "run_fleet_bench"]
