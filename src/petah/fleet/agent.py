"""The station's update agent: polls its hub, fetches releases through TUF, gates, promotes,
watches and rolls back (``petah serve --hub …``).

One step, for each task whose desired version (the hub's answer to a poll) differs from the
installed one:

1. **fetch** through python-tuf's ``Updater`` (root chain from the provisioned ``--trust-root``,
   timestamp / snapshot / targets versions and expiry, signatures, the target's length and
   sha256), with retries and backoff; bytes that fail any check are never used;
2. **check** the release is for this station's backbone fingerprint (else: reported
   ``incompatible``, never installed);
3. **gate** on the golden set, if the device keeps one for the task (``petah.fleet.gate``);
4. **promote** with the station's own atomic install (the replaced version stays as previous);
5. **watch** a health window: probe predictions must answer, with finite numbers and without
   a large slowdown; else roll back by itself.

Every step is reported to the hub (device token) and appended to ``STATE/audit.jsonl``. A
release being installed is recorded in ``STATE/agent/pending.json`` first, so a station killed
mid-install finishes the health window (or retries) after its restart.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import random
import statistics
import threading
import time
import warnings
from pathlib import Path

from petah.errors import PetahError, PetahWarning
from petah.files import AppendLog, DiskQueue, atomic_write_bytes
from petah.fleet.client import call, check_hub_url
from petah.fleet.ids import BACKBONE
from petah.fleet.metadata import parse_metadata

MAX_TRIES = 4  # per download: the first try and three retries
MAX_BACKOFF_S = 30.0
HEALTH_PROBES = 5
MAX_OUTBOX_BYTES = 4 << 20  # reports waiting for the hub (~20,000); the audit log keeps all
MAX_AUDIT_BYTES = 8 * 2**20  # the audit log rotates past this (one older file kept)
MAX_REJECTED = 1000
# probe latency, median over the window vs median before the install: coarser than the gate (which
# times whole golden passes); a single probe on a busy station measured 5x its baseline with a
# healthy release in `petah bench fleet`, hence medians and an absolute floor
HEALTH_SLOWDOWN = 3.0
HEALTH_FLOOR_S = 0.1


class Refused(PetahError):
    """A release this station must not install (incompatible, not in the signed metadata)."""

    def __init__(self, event: str, message: str):
        super().__init__(message)
        self.event = event


def finite(value) -> bool:
    """Every number in a (nested) prediction result is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(finite(v) for v in value)
    if hasattr(value, "dtype"):  # an array (a mask): integer classes, or floats checked
        import numpy as np

        return bool(np.isfinite(np.asarray(value, dtype=float)).all())
    return True


def signed_min_score(custom: dict) -> float | None:
    """The release's minimum golden score from its signed custom fields (a decimal string)."""
    value = custom.get("min_score")
    try:
        score = float(value) if isinstance(value, str) else None
    except ValueError:
        return None
    return score if score is not None and math.isfinite(score) else None


def move_key(move: dict) -> str | None:
    """What a backbone release is known by in ``rejected``: its target's name, a digest of the
    backbone, the backbone it replaces and its tasks (one backbone may come in several releases)."""
    name = str(move.get("target", "")).removeprefix("backbones/").removesuffix(".tar")
    return name if len(name) == 64 and all(c in "0123456789abcdef" for c in name) else None


def probe_image() -> bytes:
    """A textured test image for the health probes when the device keeps no golden set."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


class Agent:
    def __init__(self, station, fetcher=None):
        from petah.fleet.gate import GateRule

        config = station.config
        self.station = station
        self.hub = check_hub_url(config.hub)
        self.device_id = config.device_id
        self.token = config.device_token
        self.rule = GateRule(config.gate_tolerance)
        self.folder = station.home / "agent"
        self.metadata_dir = self.folder / "metadata"
        self.downloads = self.folder / "downloads"
        self.audit = station.home / "audit.jsonl"
        self.pending_file = self.folder / "pending.json"
        self.fetcher = fetcher
        self.rejected_file = self.folder / "rejected.json"
        self.counter_file = self.folder / "assignment.json"  # the last assignment counter taken (replays refused)
        # reports the hub did not take yet, on disk (synced): sent with the next step, after a restart too
        self.outbox = DiskQueue(self.folder / "outbox", max_bytes=MAX_OUTBOX_BYTES, sync=True)
        self.retries = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._audit_lock = threading.Lock()
        # a station that runs for months keeps at most twice MAX_AUDIT_BYTES of it
        self._audit_log = AppendLog(self.audit, max_bytes=MAX_AUDIT_BYTES)
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.rejected = self._load_rejected()  # versions this station refused: never tried again
        self.last_counter = self._load_counter()
        self.downloads.mkdir(exist_ok=True)
        for leftover in self.downloads.iterdir():  # a download cut by a crash is never used
            leftover.unlink()
        trusted = self.metadata_dir / "root.json"
        if not trusted.exists():
            data = Path(config.trust_root).read_bytes()
            parse_metadata(data, "root", f"--trust-root {config.trust_root}")
            atomic_write_bytes(trusted, data)

    # --- life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="petah-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(60)
        if self._thread is None or not self._thread.is_alive():  # else its mark could go into a reused fd
            self.outbox.close()

    def _loop(self) -> None:
        try:
            self.resume()
        except Exception as exc:  # the agent keeps going: polls still work
            self.log("error", detail=f"resuming after a restart: {str(exc).splitlines()[0][:300]}")
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as exc:  # the agent keeps going: the next poll tries again
                self.log("error", detail=str(exc).splitlines()[0][:300])
            self._stop.wait(self.station.config.poll_s * random.uniform(0.5, 1.5))  # jitter: no herd

    # --- reporting ----------------------------------------------------------------------------
    def log(self, event: str, task: str | None = None, release: int | None = None, detail: str = "",
            send: bool = True, **numbers) -> None:
        """Append to the audit log (JSON lines); queue the report for the hub."""
        record = {"at": time.time(), "device": self.device_id, "event": event, "task": task, "release": release,
                  "detail": detail, **numbers}
        with self._audit_lock:
            self._audit_log.append((json.dumps(record) + "\n").encode())
        if send and event != "error":
            report = {k: record[k] for k in ("event", "task", "release", "detail")} | numbers
            if not self.outbox.put(json.dumps(report).encode() + b"\n"):  # a hub gone for weeks
                self.log("error", detail="the report queue is full: this report stays in the audit log only",
                         send=False)

    def _hub(self, path: str, payload: dict) -> dict:
        body = json.dumps(payload).encode()
        return json.loads(call(f"{self.hub}/v1/devices/{self.device_id}/{path}", "POST", body,
                               {"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
                               timeout=15))

    def flush(self) -> None:
        while (line := self.outbox.next()) is not None:
            try:
                report = json.loads(line)
            except ValueError:  # torn by a crash mid-append
                report = None
            if isinstance(report, dict):
                try:
                    self._hub("report", report)
                except PetahError as exc:
                    if "HTTP 4" not in str(exc):  # the hub is away: keep it for the next step
                        raise
                    self.log("error", detail=f"the hub refused a report: {exc}", send=False)  # never blocks the rest
            self.outbox.delivered(line)

    # --- versions this station refused (kept across restarts) -----------------------------------
    def _load_rejected(self) -> set[str]:
        try:
            data = json.loads(self.rejected_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return set()
        return {v for v in data if isinstance(v, str) and len(v) == 64} if isinstance(data, list) else set()

    def reject(self, sha: str) -> None:
        self.rejected.add(sha)
        atomic_write_bytes(self.rejected_file, json.dumps(sorted(self.rejected)[-MAX_REJECTED:]).encode())

    def drift(self) -> dict[str, dict]:
        """Each served task's drift state and scores, as the hub keeps them (no trend)."""
        keep = ("state", "estimated", "input_drift", "feature_drift", "alarms")
        return {name: {k: v for k, v in self.station.drift.summary(name).items() if k in keep}
                for name in list(self.station.tasks)}

    # --- one round ----------------------------------------------------------------------------
    def step(self) -> None:
        """Poll once and act on the answer, task by task (one task's failure does not stop the rest)."""
        try:
            self.flush()
        except PetahError as exc:  # a report the hub cannot take now must not keep this station from polling
            self.log("error", detail=f"reports wait: {str(exc).splitlines()[0][:200]}", send=False)
        entries = dict(self.station.state.entries)
        reply = self._hub("poll", {"backbone": self.station.backbone.fingerprint,
                                   "installed": {name: e.sha256 for name, e in entries.items()},
                                   "state": "ok", "drift": self.drift()})
        desired, withdrawn, move = self.assigned(reply)
        fingerprint = self.station.backbone.fingerprint
        if isinstance(move, dict) and move_key(move) not in self.rejected:
            try:
                self.change_backbone(move)
            except Exception as exc:  # a hostile answer or a bug: reported; the station keeps its pair
                self.log("error", BACKBONE, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            self.flush()
            return  # the tasks follow on the next poll, for whichever backbone then serves
        if fingerprint in withdrawn.get(BACKBONE, []):
            self.return_backbone("the hub halted or withdrew the backbone release")
            self.flush()
            return
        for task, want in desired.items():
            entry = entries.get(task)
            try:
                if (entry is None or entry.sha256 != want["sha256"]) and want["sha256"] not in self.rejected:
                    self.update(task, want)
            except Exception as exc:  # a hostile answer or a bug: report, keep going with other tasks
                self.log("error", task, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        for task, versions in withdrawn.items():
            entry = self.station.state.entries.get(task)
            if task not in desired and entry is not None and isinstance(versions, list) and entry.sha256 in versions:
                self.step_back(task, "the hub withdrew or halted this version", avoid=set(versions))
        self.flush()

    # --- the hub's answer, checked against the director key the trusted root names ---------------
    def _trusted_root(self):
        """The newest root this station trusts (python-tuf keeps it as ``metadata/root.json``)."""
        path = self.metadata_dir / "root.json"
        return parse_metadata(path.read_bytes(), "root", "the station's trusted root").signed

    def _load_counter(self) -> tuple[str | None, int]:
        """The director key and counter of the last assignment taken."""
        try:
            data = json.loads(self.counter_file.read_text(encoding="utf-8"))
            keyid, counter = data["keyid"], data["counter"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, 0
        return (keyid, counter) if isinstance(keyid, str) and isinstance(counter, int) else (None, 0)

    def _acts_on(self, desired: dict, withdrawn: dict, move) -> bool:
        """Whether an answer would change anything this station runs."""
        if isinstance(move, dict) and move_key(move) not in self.rejected:
            return True
        if self.station.backbone.fingerprint in withdrawn.get(BACKBONE, []):
            return True
        entries = self.station.state.entries
        for task, want in desired.items():
            sha = want.get("sha256") if isinstance(want, dict) else None
            if sha not in self.rejected and (task not in entries or entries[task].sha256 != sha):
                return True
        return any(task not in desired and task in entries and isinstance(versions, list)
                   and entries[task].sha256 in versions for task, versions in withdrawn.items())

    def assigned(self, reply: dict) -> tuple[dict, dict, dict | None]:
        """What the hub's answer asks this station to run (``desired``), to return from
        (``withdrawn``) and which backbone to move to (a backbone release, or None). Where the
        trusted root names a director key, only a signed assignment for this device and backbone,
        newer than the last one taken and not expired, is acted on (``petah.fleet.assignments``);
        before it changes anything the station refreshes its TUF metadata (a rotated or revoked
        director key is then known) and checks it again."""
        from petah.fleet.assignments import director_key, verify

        if not isinstance(reply, dict):
            raise PetahError("the hub's poll answer is malformed")
        refreshed = False
        while True:
            key = director_key(self._trusted_root())
            try:
                if key is None:  # a hub without a director: its answer is its word (docs/deploy.md)
                    if "assignment" in reply or "desired" not in reply:
                        # signed answers: the hub's root names a director this station has not seen yet
                        raise PetahError("the hub answers with assignments but this station's trusted root names "
                                         "no director key")
                    desired, withdrawn, counter = reply.get("desired", {}), reply.get("withdrawn", {}), None
                    move = reply.get(BACKBONE)
                else:
                    # the counter of another key does not bind this one (a revoked key's counter is forgotten)
                    last = self.last_counter[1] if self.last_counter[0] == key.keyid else 0
                    signed = verify(reply.get("assignment"), key, self.device_id, self.station.backbone.fingerprint,
                                    last)
                    desired, withdrawn, counter = signed["desired"], signed["withdrawn"], signed["counter"]
                    move = signed.get(BACKBONE)
                if not isinstance(desired, dict) or not isinstance(withdrawn, dict):
                    raise PetahError("the hub's poll answer is malformed")
            except PetahError:
                if refreshed:
                    raise
                self._updater()  # the root may have moved on (a new director key): follow it, then decide
                refreshed = True
                continue
            if refreshed or not self._acts_on(desired, withdrawn, move):
                break
            self._updater()
            refreshed = True
        if counter is not None:
            self.last_counter = (key.keyid, counter)
            atomic_write_bytes(self.counter_file, json.dumps({"keyid": key.keyid, "counter": counter}).encode())
        return desired, withdrawn, move

    def step_back(self, task: str, reason: str, release: int | None = None, avoid: set[str] = frozenset()) -> None:
        """Return a task to its previous version (or stop serving it when it has none, or when
        the previous one was refused or withdrawn too)."""
        entry = self.station.state.entries[task]
        previous = entry.previous if entry.previous not in self.rejected | set(avoid) else None
        if previous is not None:
            self.station.rollback(task)
        else:
            self.station.delete(task)
        self.log("returned", task, release, f"{reason}; now on "
                 f"{previous[:12] if previous else 'nothing (no usable previous version)'}")

    def update(self, task: str, want: dict) -> None:
        sha, release = str(want["sha256"]), want.get("release")
        release = release if isinstance(release, int) else None
        entry = self.station.state.entries.get(task)
        if entry is not None and entry.previous == sha:
            # the version before, still on disk: no download, but only while the signed targets
            # still list it (a hub's word alone never brings back a withdrawn version)
            try:
                self.signed_target(want)
            except PetahError as exc:
                self.log("download_failed", task, release, f"returning to the previous version: {exc}")
                return
            self.step_back(task, "the hub asks for the previous version", release)
            return
        try:
            path, custom, tries = self.download(want)
        except Refused as exc:
            self.reject(sha)
            self.log(exc.event, task, release, str(exc))
            return
        except PetahError as exc:
            self.log("download_failed", task, release, str(exc), retries=MAX_TRIES - 1)
            return
        try:
            self.log("downloaded", task, release, bytes=path.stat().st_size, retries=tries - 1)
            self._promote(task, sha, release, path, custom)
        finally:
            path.unlink(missing_ok=True)

    def _updater(self):
        from tuf.ngclient import Updater

        updater = Updater(str(self.metadata_dir), f"{self.hub}/metadata/", str(self.downloads),
                          f"{self.hub}/targets/", fetcher=self.fetcher, bootstrap=None)
        updater.refresh()
        return updater

    def signed_target(self, want: dict, updater=None, backbone: str | None = None):
        """The release's entry in the signed targets metadata (refreshed through TUF); a target the
        metadata does not list (yet: a cache may lag) is an error worth retrying, one for another
        backbone (this station's, or ``backbone``) a refusal."""
        updater = updater or self._updater()
        info = updater.get_targetinfo(str(want["target"]))
        if info is None or info.hashes.get("sha256") != want["sha256"]:
            raise PetahError(f"{want['target']} is not in the hub's signed targets metadata")
        custom = info.unrecognized_fields.get("custom")
        custom = custom if isinstance(custom, dict) else {}
        backbone = backbone or self.station.backbone.fingerprint
        if custom.get("backbone") != backbone:
            raise Refused("incompatible", f"release for backbone {str(custom.get('backbone'))[:16]}…; this "
                                          f"station runs {backbone[:16]}…")
        return info, custom

    def download(self, want: dict, backbone: str | None = None) -> tuple[Path, dict, int]:
        """The release's package file, verified by TUF; retried with backoff. Returns its path,
        its signed custom fields and the number of tries it took."""
        last = "no try"
        for attempt in range(1, MAX_TRIES + 1):
            try:
                updater = self._updater()
                info, custom = self.signed_target(want, updater, backbone)
                part = self.downloads / f"{want['sha256']}.part"
                updater.download_target(info, str(part))
                return part, custom, attempt
            except Refused:
                raise
            except Exception as exc:  # TUF's refusals (expired, unsigned, rolled back, bad hash) and I/O
                last = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                self.retries += 1
                if attempt < MAX_TRIES and not self._stop.is_set():
                    self._stop.wait(min(MAX_BACKOFF_S, 2 ** (attempt - 1)) * random.uniform(0.5, 1.5))
        raise PetahError(f"download failed after {MAX_TRIES} tries: {last}")

    def _check(self, task: str, sha: str, release: int | None, path: Path, custom: dict) -> str | None:
        """Package and golden-set checks of a downloaded release: None when it may be installed,
        else the event to report (the reason is logged)."""
        from petah.fleet.gate import score_versions
        from petah.packages import read_package

        manifest = read_package(path).manifest  # the bytes TUF verified, verified again as a package
        if manifest.backbone.fingerprint != self.station.backbone.fingerprint or manifest.task.name != task:
            self.log("incompatible", task, release, "the package's manifest names another backbone or task")
            return "incompatible"
        entry = self.station.state.entries.get(task)
        if not self.station.config.golden:
            return None
        versions = {"candidate": path}
        if entry is not None:
            versions["current"] = self.station.state.package_path(entry.sha256)
        return self._gate(task, release, custom, lambda: score_versions(
            self.station.backbone, versions, self.station.config.golden, self.station.engine))

    def _gate(self, task: str, release: int | None, custom: dict, score) -> str | None:
        """The golden-set rule on ``score()`` ({"candidate": Score, "current": Score}, or None where
        the device keeps no set for the task): None when it passes, else the event reported."""
        scores = score()
        if scores is None:
            return None
        min_score = signed_min_score(custom)
        reason = self.rule.judge(scores["candidate"], scores.get("current"), min_score)
        if reason and self.rule.judge(dataclasses.replace(scores["candidate"], seconds=0.0), scores.get("current"),
                                      min_score) is None:
            # the time rule alone refused it: a station serving its own requests measured identical
            # versions 1.21x and 1.25x apart, beside a CPU hog 1.27x even in a second timing
            # (`petah bench fleet --load-pause-s / --hogs`): the slowdown must hold in a second timing,
            # judged by each batch's fastest round of both (other work on the device only adds time)
            again = score()
            scores = {k: dataclasses.replace(s, seconds=min(s.fastest, again[k].fastest)) for k, s in scores.items()}
            reason = self.rule.judge(scores["candidate"], scores.get("current"), min_score)
            reason = reason and f"{reason}, timed twice, fastest rounds"
        detail = ", ".join(f"{k} {s.metric} {s.value:.2f} in {s.seconds * 1000:.0f} ms" for k, s in scores.items())
        if reason:
            self.log("gate_rejected", task, release, f"{reason} ({detail})")
            return "gate_rejected"
        self.log("gate_passed", task, release, detail)
        return None

    def _promote(self, task: str, sha: str, release: int | None, path: Path, custom: dict) -> None:
        try:
            refused = self._check(task, sha, release, path, custom)
        except Exception as exc:  # a package that breaks the checks is a failed release, not a retry
            refused = "install_failed"
            self.log(refused, task, release, f"checking it failed: {type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
        if refused:
            self.reject(sha)
            return
        entry = self.station.state.entries.get(task)
        baseline = self.baseline_seconds(task) if entry is not None else None
        atomic_write_bytes(self.pending_file, json.dumps({"task": task, "sha256": sha, "release": release,
                                                          "baseline": baseline}).encode())
        self.station.candidates[task] = sha
        try:
            self.station.install(path.read_bytes(), task)
        except Exception as exc:
            self.reject(sha)
            self.pending_file.unlink(missing_ok=True)
            self.station.candidates.pop(task, None)
            self.log("install_failed", task, release, str(exc).splitlines()[0][:300])
            return
        self.log("installed", task, release, f"version {sha[:12]}")
        self.watch(task, sha, release, baseline)

    def health(self, baselines: dict[str, float | None]) -> tuple[bool, str | None]:
        """The health window over ``baselines``' tasks: probes spread over ``--health-window-s``.
        (stopped, the problem found or None)."""
        window = self.station.config.health_window_s
        times: dict[str, list[float]] = {task: [] for task in baselines}
        for _ in range(HEALTH_PROBES):
            if self._stop.wait(window / HEALTH_PROBES):
                return True, None  # stopping: pending.json stays, the next start watches again
            for task in baselines:
                where = f"task {task}: " if len(baselines) > 1 else ""
                try:
                    seconds = self.probe_seconds(task)
                except Exception as exc:
                    return False, f"{where}probe failed: {str(exc).splitlines()[0][:200]}"
                if seconds is None:
                    return False, f"{where}non-finite outputs"
                times[task].append(seconds)
        for task, baseline in baselines.items():
            median = statistics.median(times[task]) if times[task] else None
            if baseline and median and median > HEALTH_SLOWDOWN * baseline and median - baseline > HEALTH_FLOOR_S:
                where = f"task {task}: " if len(baselines) > 1 else ""
                return False, f"{where}probes took {median / baseline:.1f}x as long as before the install (medians)"
        return False, None

    def watch(self, task: str, sha: str, release: int | None, baseline: float | None) -> None:
        """The health window of one task's new version; a failed one rolls back."""
        window = self.station.config.health_window_s
        stopped, problem = self.health({task: baseline})
        if stopped:
            return
        if problem:
            self.reject(sha)  # first: a restart from here on never installs it again
            self.step_back(task, f"health window failed: {problem}", release)
            self.log("health_rollback", task, release, problem)
        else:
            self.log("promoted", task, release, f"version {sha[:12]} healthy for {window:g} s")
        self.station.candidates.pop(task, None)
        self.pending_file.unlink(missing_ok=True)  # last: a crash before it repeats the window

    # --- a backbone release: a new backbone and every task adapted on it, as one change ---------
    def change_backbone(self, move: dict) -> None:
        """Move to the backbone a release assigns, with every task adapted on it: all of it
        downloaded through TUF and verified, each task gated (the new pair against the pair it
        replaces), swapped in at once, then the health window over every task; a failure at any
        point leaves (or puts) the station on its old pair."""
        from petah.device import DeviceBackbone

        sha, fingerprint, tasks = move_key(move), move.get("fingerprint"), move.get("tasks")
        release = move.get("release") if isinstance(move.get("release"), int) else None
        if sha is None or not isinstance(fingerprint, str) or not isinstance(tasks, dict) or not all(
                isinstance(m, dict) and {"sha256", "target"} <= set(m) for m in tasks.values()):
            raise PetahError("the hub's backbone assignment is malformed")
        refusal = None
        if not isinstance(self.station.backbone, DeviceBackbone):
            refusal = "this station serves a torch backbone; a backbone release carries a device backbone folder"
        elif missing := sorted(set(self.station.tasks) - set(tasks)):
            refusal = f"the release carries no package for task {missing[0]}, which this station serves"
        if refusal:
            self.reject(sha)
            self.log("incompatible", BACKBONE, release, refusal)
            return
        files: dict[str, Path] = {}
        try:
            files[BACKBONE], custom, tries = self.download(move)
            if custom.get("kind") != "backbone" or custom.get("fingerprint") != fingerprint or custom.get("tasks") != {
                    task: member["sha256"] for task, member in tasks.items()}:
                raise Refused("incompatible", "the signed targets do not name this backbone release as assigned")
            for task, member in tasks.items():
                files[task], _, more = self.download(member, backbone=fingerprint)
                tries += more - 1
        except Refused as exc:
            self._discard(files)
            self.reject(sha)
            self.log(exc.event, BACKBONE, release, str(exc))
            return
        except PetahError as exc:
            self._discard(files)
            self.log("download_failed", BACKBONE, release, str(exc), retries=MAX_TRIES - 1)
            return
        try:
            self.log("downloaded", BACKBONE, release, f"backbone {fingerprint[:12]} and {len(tasks)} task(s)",
                     bytes=sum(f.stat().st_size for f in files.values()), retries=tries - 1)
            baselines = self._switch(sha, fingerprint, release, files, custom)
        finally:
            self._discard(files)
        if baselines is not None:
            self.watch_backbone(sha, release, baselines)

    def _discard(self, files: dict[str, Path]) -> None:
        for path in files.values():
            path.unlink(missing_ok=True)

    def _switch(self, sha: str, fingerprint: str, release: int | None, files: dict[str, Path],
                custom: dict) -> dict | None:
        """Unpack, check, gate and swap in a downloaded backbone release; the health window's
        baselines, or None when it was refused (reported)."""
        from petah.device.bundle import unpack_device_backbone
        from petah.fleet.gate import score_versions
        from petah.packages import read_manifest

        station = self.station
        try:
            backbone = unpack_device_backbone(files[BACKBONE].read_bytes(),
                                              station.installed_backbone_folder(fingerprint), fingerprint)
            packages = {task: path for task, path in files.items() if task != BACKBONE}
            for task, path in packages.items():
                manifest = read_manifest(path)
                if manifest.backbone.fingerprint != fingerprint or manifest.task.name != task:
                    raise Refused("incompatible", f"package {task}'s manifest names another backbone or task")
            engine = station.new_engine(backbone, len(packages))
            for task, path in packages.items():
                entry = station.state.entries.get(task) if station.config.golden else None

                def score(path=path, entry=entry):
                    scores = score_versions(backbone, {"candidate": path}, station.config.golden, engine)
                    if scores is not None and entry is not None:
                        scores |= score_versions(station.backbone, {"current": station.state.package_path(
                            entry.sha256)}, station.config.golden, station.engine) or {}
                    return scores

                refused = self._gate(task, release, custom, score) if station.config.golden else None
                if refused:
                    self.reject(sha)
                    return None
            baselines = {task: self.baseline_seconds(task) for task in station.tasks}
            atomic_write_bytes(self.pending_file, json.dumps({"backbone": fingerprint, "sha256": sha,
                                                              "release": release, "baselines": baselines}).encode())
            station.change_backbone(backbone, {task: path.read_bytes() for task, path in packages.items()}, engine)
        except Refused as exc:
            self.reject(sha)
            self.log(exc.event, BACKBONE, release, str(exc))
            return None
        except Exception as exc:  # a release that breaks the checks or the swap is a failed release
            self.reject(sha)
            self.pending_file.unlink(missing_ok=True)
            self.log("install_failed", BACKBONE, release, f"{type(exc).__name__}: "
                                                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}")
            return None
        self.log("installed", BACKBONE, release, f"backbone {fingerprint[:12]} with {len(packages)} task(s)")
        return baselines

    def watch_backbone(self, sha: str, release: int | None, baselines: dict[str, float | None]) -> None:
        """The health window after a backbone change, over every task; a failure moves back."""
        stopped, problem = self.health(baselines)
        if stopped:
            return
        fingerprint = self.station.backbone.fingerprint
        if problem:
            self.reject(sha)  # first: a restart from here on never moves again
            self.return_backbone(f"health window failed: {problem}", release)
            self.log("health_rollback", BACKBONE, release, problem)
        else:
            self.log("promoted", BACKBONE, release, f"backbone {fingerprint[:12]} and its {len(baselines)} task(s) "
                                                    f"healthy for {self.station.config.health_window_s:g} s")
            self.station.drop_standby()
        self.pending_file.unlink(missing_ok=True)  # last: a crash before it repeats the window

    def return_backbone(self, reason: str, release: int | None = None) -> None:
        left = self.station.backbone.fingerprint
        try:
            self.station.return_backbone()
        except PetahError as exc:
            self.log("error", BACKBONE, release, f"{reason}, but returning failed: {str(exc).splitlines()[0][:200]}")
            return
        self.log("returned", BACKBONE, release, f"{reason}; left backbone {left[:12]}, now on "
                                                f"{self.station.backbone.fingerprint[:12]}")

    def baseline_seconds(self, task: str) -> float | None:
        """The current version's probe time (median of three), before a candidate replaces it."""
        times = [self.probe_seconds(task) for _ in range(3)]
        return statistics.median(times) if None not in times else None

    def probe_seconds(self, task: str) -> float | None:
        """One prediction through the station's own path (decode, queue, batch); its seconds, or
        None when any number in the answer is not finite."""
        started = time.perf_counter()
        results = self.station.predict_now([("health-probe", self._probe)], (task,))
        seconds = time.perf_counter() - started
        return seconds if finite(results) else None

    @property
    def _probe(self) -> bytes:
        if not hasattr(self, "_probe_bytes"):
            self._probe_bytes = probe_image()
        return self._probe_bytes

    def resume(self) -> None:
        """After a restart: finish the health window of an install that reached the state dir, or
        forget one that did not (the next poll fetches it again)."""
        if not self.pending_file.exists():
            return
        try:
            pending = json.loads(self.pending_file.read_text(encoding="utf-8"))
            task, sha = str(pending.get("task")), str(pending["sha256"])
        except (OSError, ValueError, KeyError, TypeError):
            warnings.warn("agent: unreadable pending.json ignored", PetahWarning, stacklevel=2)
            self.pending_file.unlink(missing_ok=True)
            return
        if "backbone" in pending:
            self._resume_backbone(pending)
            return
        entry = self.station.state.entries.get(task)
        if sha in self.rejected:  # it failed its window and the crash came before the rollback landed
            if entry is not None and entry.sha256 == sha:
                self.step_back(task, "health window failed before a restart", pending.get("release"))
            self.pending_file.unlink(missing_ok=True)
        elif entry is not None and entry.sha256 == sha:
            self.log("installed", task, pending.get("release"), "resumed after a restart")
            self.station.candidates[task] = sha
            self.watch(task, sha, pending.get("release"), pending.get("baseline"))
        else:
            self.log("error", task, pending.get("release"), "an install was interrupted before it landed")
            self.pending_file.unlink(missing_ok=True)

    def _resume_backbone(self, pending: dict) -> None:
        """After a restart in the middle of a backbone change: watch the new pair again, or move
        back where its window had failed, or forget a change that never landed."""
        sha, release = str(pending.get("sha256")), pending.get("release")
        moved = self.station.backbone.fingerprint == pending.get("backbone")
        baselines = pending.get("baselines")
        if moved and sha in self.rejected:
            self.return_backbone("health window failed before a restart", release)
        elif moved and isinstance(baselines, dict):
            self.log("installed", BACKBONE, release, "resumed after a restart")
            self.watch_backbone(sha, release, baselines)
            return
        elif not moved:
            self.log("error", BACKBONE, release, "a backbone change was interrupted before it landed")
        self.pending_file.unlink(missing_ok=True)


__all__ = ["Agent", "Refused", "finite"]
