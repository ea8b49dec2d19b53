"""The hub's state: releases and their rollout stage, devices, their reports — on SQLite or
PostgreSQL (``petah.fleet.database``). The rollout rules live here, next to the data they read:

- a device joins a release's rollout by a stable hash of its id: the compatible devices (same
  backbone fingerprint) sorted by sha256(id); stage k holds the first ``ceil(stages[k] % * N)``
  (at least one), so stages only grow and a device never leaves one. The order is computed once
  per backbone and device count, not per poll;
- a release advances when at least ``min_healthy`` of its current stage's devices report it
  promoted, and halts when failures (gate rejections, health rollbacks, failed installs) among
  them reach ``max_failed`` of the stage; a halted or withdrawn release is taken out of every
  device's desired set, so devices that had it return to their previous version;
- a backbone release (``kind`` "backbone") moves the devices of one backbone (``backbone``) to a
  new one (``to_backbone``) together with every task adapted on it (``members``: task -> sha256
  and target): its stages count the devices of both backbones (a device that moved stays in its
  stage); a device of the old backbone in a stage is assigned the new backbone, one of the new
  backbone runs the members (unless a newer task release for that backbone replaces one), and a
  halted or withdrawn backbone release sends the devices that moved back (``withdrawn["@backbone"]``);
- an operator (the hub's admin token: its page or ``petah hub pause | resume | halt``) may pause a
  rolling release (its stage's devices keep it, no stage advances), resume a paused or halted one,
  or halt one (a roll back: devices return). A withdrawn release never comes back: that takes the
  release key, which signed it out of the targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from petah.errors import PetahError
from petah.fleet.database import Database
from petah.fleet.ids import BACKBONE

ACTIVE = ("rolling", "complete", "paused")
OPERATIONS = {"pause": ({"rolling"}, "paused"), "resume": ({"paused", "halted"}, "rolling"),
              "halt": ({"rolling", "paused", "complete"}, "halted")}  # action: (from states, to state)
FAILED_EVENTS = {"gate_rejected", "health_rollback", "install_failed"}
PROBLEM_EVENTS = FAILED_EVENTS | {"download_failed", "incompatible"}
EVENTS = {"downloaded", "gate_passed", "installed", "promoted", "incompatible", "returned", "download_failed",
          *FAILED_EVENTS}


def stage_rank(device_id: str) -> str:
    """A device's place in every rollout: stable, and unrelated to when it registered."""
    return hashlib.sha256(device_id.encode()).hexdigest()


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Release:
    id: int
    task: str
    backbone: str
    sha256: str
    target: str
    bytes: int
    stages: list[int]
    min_healthy: float
    max_failed: float
    min_score: float | None
    stage: int
    state: str
    created: float
    stage_times: list[float]
    kind: str = "task"
    to_backbone: str | None = None
    members: dict = None  # a backbone release's tasks: name -> {"sha256", "target"}

    @classmethod
    def from_row(cls, row) -> Release:
        values = dict(row)
        values["stages"] = json.loads(values["stages"])
        values["stage_times"] = json.loads(values["stage_times"])
        values["members"] = json.loads(values.get("members") or "{}")
        return cls(**values)

    @property
    def audience(self) -> tuple[str, ...]:
        """The backbones whose devices its stages count."""
        return (self.backbone, self.to_backbone) if self.kind == "backbone" else (self.backbone,)

    @property
    def percent(self) -> int:
        return 100 if self.state == "complete" else self.stages[min(self.stage, len(self.stages) - 1)]


def check_rollout(stages: list[int], min_healthy: float, max_failed: float) -> None:
    if not stages or any(not 0 < s <= 100 for s in stages) or stages != sorted(set(stages)) or stages[-1] != 100:
        raise PetahError(f"--stages must rise strictly from above 0 to 100 (percent of devices), got {stages}")
    if not 0 < min_healthy <= 1:
        raise PetahError(f"--min-healthy must be in (0, 1], got {min_healthy}")
    if not 0 < max_failed <= 1:
        raise PetahError(f"--max-failed must be in (0, 1], got {max_failed}")


class Registry:
    """The hub's tables (a SQLite file, or a ``postgresql://`` URL several hubs share); every
    method is one transaction (the hub serves requests on threads, maybe in several processes)."""

    def __init__(self, target: str | Path):
        self.db = Database(target)
        self._ranked: dict[tuple, tuple[int, dict[str, int]]] = {}  # backbones -> (generation, place by stage rank)
        self._advanced_at: int | None = None  # the devices generation the rules last ran at in a poll

    def _tx(self, fn):
        return self.db.transaction(fn)

    def _all(self, sql: str, params: tuple = ()) -> list:
        return self.db.all(sql, params)

    def _one(self, sql: str, params: tuple = ()):
        return self.db.one(sql, params)

    def close(self) -> None:
        self.db.close()

    # --- devices ----------------------------------------------------------------------------------
    def add_device(self, device_id: str, token: str) -> None:
        self.add_devices([(device_id, token)])

    def add_devices(self, devices: list[tuple[str, str]]) -> None:
        """Register (id, token) pairs in one transaction: all or none."""
        def add(db):
            for device_id, token in devices:
                if db.execute("SELECT 1 FROM devices WHERE id=?", (device_id,)).fetchone():
                    raise PetahError(f"device {device_id} is already registered")
                db.execute("INSERT INTO devices (id, token_sha256) VALUES (?, ?)", (device_id, token_hash(token)))
            self._bump(db)
        self._tx(add)

    @staticmethod
    def _bump(db) -> None:
        """The set of devices of some backbone changed: every process sorts its stage order again."""
        db.execute("UPDATE generations SET value = value + 1 WHERE name='devices'")

    def token_matches(self, device_id: str, token: str) -> bool:
        import hmac

        row = self._one("SELECT token_sha256 FROM devices WHERE id=?", (device_id,))
        return row is not None and hmac.compare_digest(row["token_sha256"], token_hash(token))

    def devices(self) -> list[dict]:
        rows = self._all("SELECT id, backbone, last_seen, state, installed, drift FROM devices ORDER BY id")
        return [{**dict(r), "installed": json.loads(r["installed"]), "drift": json.loads(r["drift"])} for r in rows]

    # --- releases ---------------------------------------------------------------------------------
    def add_release(self, task: str, backbone: str, sha256: str, target: str, size: int, stages: list[int],
                    min_healthy: float, max_failed: float, min_score: float | None, *, to_backbone: str | None = None,
                    members: dict | None = None) -> Release:
        """A task release, or with ``to_backbone`` a backbone release (``task`` is then ``@backbone``)."""
        check_rollout(stages, min_healthy, max_failed)
        now = time.time()
        kind = "task" if to_backbone is None else "backbone"

        def add(db):
            sql = ("INSERT INTO releases (task, backbone, sha256, target, bytes, stages, min_healthy, max_failed, "
                   "min_score, stage, state, created, stage_times, kind, to_backbone, members) "
                   "VALUES (?,?,?,?,?,?,?,?,?,0,'rolling',?,'[]',?,?,?)")
            values = (task, backbone, sha256, target, size, json.dumps(stages), min_healthy, max_failed, min_score,
                      now, kind, to_backbone, json.dumps(members or {}))
            if db.dialect == "sqlite":  # lastrowid: RETURNING needs SQLite 3.35
                return db.execute(sql, values).lastrowid
            return db.execute(sql + " RETURNING id", values).fetchone()["id"]
        return self.release(self._tx(add))

    def release(self, release_id: int) -> Release:
        row = self._one("SELECT * FROM releases WHERE id=?", (release_id,))
        if row is None:
            raise PetahError(f"no release {release_id}")
        return Release.from_row(row)

    def releases(self) -> list[Release]:
        return [Release.from_row(r) for r in self._all("SELECT * FROM releases ORDER BY id")]

    def set_state(self, release_id: int, state: str) -> None:
        self._tx(lambda db: db.execute("UPDATE releases SET state=? WHERE id=?", (state, release_id)))

    def operate(self, release_id: int, action: str) -> str:
        """An operator's pause / resume / halt (see the module's doc); the release's new state."""
        if action not in OPERATIONS:
            raise PetahError(f"unknown action {action!r} (one of {', '.join(OPERATIONS)})")
        sources, target = OPERATIONS[action]

        def operate(db):
            row = db.execute("SELECT * FROM releases WHERE id=?", (release_id,)).fetchone()
            if row is None:
                raise KeyError(release_id)
            if row["state"] not in sources:
                raise PetahError(f"release {release_id} is {row['state']}: only a release that is "
                                 f"{' or '.join(sorted(sources))} can {action}")
            db.execute("UPDATE releases SET state=? WHERE id=?", (target, release_id))
            self._log_stage(db, release_id, row["stage"], target, f"operator: {action}")
            if target == "rolling":
                # the failures that halted it were the operator's to judge: they no longer count
                # (their reports stay); stations must fail again to halt it
                db.execute("DELETE FROM outcomes WHERE release=? AND outcome='failed'", (release_id,))
                self._advance(db, Release.from_row({**dict(row), "state": target}))
            return db.execute("SELECT state FROM releases WHERE id=?", (release_id,)).fetchone()["state"]
        return self._tx(operate)

    def failures(self, release_id: int, limit: int = 20) -> list[dict]:
        """The newest reports of what went wrong with a release on devices, and why."""
        rows = self._all("SELECT device, event, at, detail FROM reports WHERE release=? AND event IN "
                         f"({','.join('?' * len(PROBLEM_EVENTS))}) ORDER BY at DESC LIMIT ?",
                         (release_id, *sorted(PROBLEM_EVENTS), limit))
        return [dict(r) for r in rows]

    def _generation(self) -> int:
        return self._one("SELECT value FROM generations WHERE name='devices'")["value"]

    def _places(self, backbones: tuple[str, ...]) -> dict[str, int]:
        """Each device of some backbones' place in every rollout's order: sorted again only when the
        set of devices changed (a device added, or one reporting another backbone: the database's
        ``devices`` generation, so every hub process sharing it notices), not per poll."""
        generation = self._generation()
        cached = self._ranked.get(backbones)
        if cached is None or cached[0] != generation:
            rows = self._all(f"SELECT id FROM devices WHERE backbone IN ({','.join('?' * len(backbones))})", backbones)
            ids = sorted((r["id"] for r in rows), key=stage_rank)
            cached = self._ranked[backbones] = (generation, {device: place for place, device in enumerate(ids)})
        return cached[1]

    def _stage_size(self, release: Release, stage: int, devices: int) -> int:
        percent = release.stages[min(stage, len(release.stages) - 1)]
        return max(1, math.ceil(percent / 100 * devices)) if devices else 0

    def _in_stage(self, device_id: str, release: Release) -> bool:
        places = self._places(release.audience)
        place = places.get(device_id)
        return place is not None and place < self._stage_size(release, release.stage, len(places))

    def _stage_members(self, release: Release, stage: int) -> list[str]:
        places = self._places(release.audience)
        size = self._stage_size(release, stage, len(places))
        return [device for device, place in places.items() if place < size]

    def stage_counts(self, release: Release) -> dict:
        """The current stage's devices and how many of them report the release promoted / failed."""
        members = self._stage_members(release, release.stage)
        outcomes = {r["device"]: r["outcome"] for r in self._all(
            "SELECT device, outcome FROM outcomes WHERE release=?", (release.id,))}
        return {"devices": len(members),
                "promoted": sum(outcomes.get(d) == "promoted" for d in members),
                "failed": sum(outcomes.get(d) == "failed" for d in members),
                "failed_total": sum(v == "failed" for v in outcomes.values())}

    def _advance(self, db, release: Release) -> None:
        """Apply the rollout rules to one rolling release (inside a transaction)."""
        while release.state == "rolling":
            counts = self.stage_counts(release)
            members = counts["devices"]
            if members == 0:
                return
            if counts["failed"] and counts["failed"] >= release.max_failed * members:
                db.execute("UPDATE releases SET state='halted' WHERE id=?", (release.id,))
                self._log_stage(db, release.id, release.stage, "halted", f"rules: {counts['failed']} failed")
                return
            if counts["promoted"] < release.min_healthy * members:
                return
            release.stage_times.append(time.time())
            release.stage += 1
            if release.stage >= len(release.stages):
                release.state, release.stage = "complete", len(release.stages) - 1
            db.execute("UPDATE releases SET stage=?, state=?, stage_times=? WHERE id=?",
                       (release.stage, release.state, json.dumps(release.stage_times), release.id))
            self._log_stage(db, release.id, release.stage, release.state, f"rules: {counts['promoted']} promoted")

    @staticmethod
    def _log_stage(db, release_id: int, stage: int, state: str, by: str) -> None:
        db.execute("INSERT INTO stage_changes (release, stage, state, by, at) VALUES (?,?,?,?,?)",
                   (release_id, stage, state, by, time.time()))

    def stage_history(self, release_id: int) -> list[dict]:
        """Every stage change of a release, oldest first: stage, state, by whom, when."""
        return self._all("SELECT stage, state, by, at FROM stage_changes WHERE release=? ORDER BY at",
                         (release_id,))

    # --- what devices say and get -----------------------------------------------------------------
    def poll(self, device_id: str, backbone: str, installed: dict[str, str], state: str,
             drift: dict[str, dict] | None = None) -> dict:
        """Record a device's check-in (``drift``: per task, its drift check's state and scores);
        returns what it should run (per task: the release it is in the rollout of, newest first),
        which versions were withdrawn (to return from) and the device's next assignment counter."""
        # The rules run in a poll only when the devices changed; otherwise a poll writes its own
        # device's row alone and takes the lock's shared form, so polls through several hubs run
        # side by side (reports, operators and rule-running polls take it exclusively).
        seen = self._one("SELECT d.backbone AS backbone, g.value AS generation FROM devices d, generations g "
                         "WHERE d.id=? AND g.name='devices'", (device_id,))
        rules = seen is None or seen["backbone"] != backbone or seen["generation"] != self._advanced_at
        advanced_at = []

        def poll(db):
            before = db.execute("SELECT backbone FROM devices WHERE id=?", (device_id,)).fetchone()
            if before is not None and before["backbone"] != backbone:
                self._bump(db)
            # the assignment counter rises with every answer and is floored by the clock in
            # milliseconds, so a database restored from a backup still counts above what stations saw
            greatest = "GREATEST" if db.dialect == "postgresql" else "MAX"
            db.execute(f"UPDATE devices SET assignment_counter = {greatest}(assignment_counter + 1, ?) WHERE id=?",
                       (time.time_ns() // 1_000_000, device_id))
            counter = db.execute("SELECT assignment_counter FROM devices WHERE id=?",
                                 (device_id,)).fetchone()["assignment_counter"]
            db.execute("UPDATE devices SET backbone=?, installed=?, state=?, drift=?, last_seen=? WHERE id=?",
                       (backbone, json.dumps(installed), state, json.dumps(drift or {}), time.time(), device_id))
            releases = self.releases()
            generation = self._generation()
            if rules and generation != self._advanced_at:
                # stage sizes follow the device count: re-apply the rules when the devices changed
                # (reports and operators apply them on every change of outcome or state)
                for release in releases:
                    if release.state == "rolling":
                        self._advance(db, release)
                releases = self.releases()
                advanced_at.append(generation)  # kept once the transaction committed
            desired, withdrawn, moves = {}, {}, {}
            for release in reversed(releases):
                if release.kind == "backbone":
                    self._backbone_answer(db, release, device_id, backbone, desired, withdrawn, moves)
                    continue
                if release.backbone != backbone:
                    continue
                if release.state not in ACTIVE:
                    withdrawn.setdefault(release.task, []).append(release.sha256)
                    continue
                if release.task in desired:
                    continue
                if release.state == "paused" and installed.get(release.task) != release.sha256 and not db.execute(
                        "SELECT 1 FROM outcomes WHERE device=? AND release=?", (device_id, release.id)).fetchone():
                    continue  # paused: no station that has not taken it yet starts now
                if release.state == "complete" or self._in_stage(device_id, release):
                    desired[release.task] = {"release": release.id, "target": release.target,
                                             "sha256": release.sha256, "min_score": release.min_score}
            answer = {"desired": desired, "withdrawn": withdrawn, "counter": counter}
            return answer | moves  # "backbone": the new backbone to move to, where one is assigned
        answer = self.db.transaction(poll, shared=not rules)
        if advanced_at:
            self._advanced_at = advanced_at[-1]
        return answer

    def _backbone_answer(self, db, release: Release, device_id: str, backbone: str, desired: dict,
                         withdrawn: dict, moves: dict) -> None:
        """A backbone release's part of a device's answer (releases come newest first)."""
        active = release.state in ACTIVE
        if backbone == release.to_backbone:  # the device moved: it runs the members, or moves back
            if not active:
                withdrawn.setdefault(BACKBONE, []).append(release.to_backbone)
                return
            for task, member in release.members.items():
                desired.setdefault(task, {"release": release.id, "target": member["target"],
                                          "sha256": member["sha256"], "min_score": release.min_score})
            return
        if backbone != release.backbone or not active or BACKBONE in moves:
            return
        if release.state == "paused" and not db.execute("SELECT 1 FROM outcomes WHERE device=? AND release=?",
                                                        (device_id, release.id)).fetchone():
            return
        if release.state == "complete" or self._in_stage(device_id, release):
            moves[BACKBONE] = {"release": release.id, "target": release.target, "sha256": release.sha256,
                               "fingerprint": release.to_backbone, "min_score": release.min_score,
                               "tasks": release.members}

    def report(self, device_id: str, event: str, release_id: int | None, task: str | None, detail: str,
               size: int = 0, retries: int = 0) -> None:
        if event not in EVENTS:
            raise PetahError(f"unknown event {event!r} (one of {', '.join(sorted(EVENTS))})")

        def report(db):
            now = time.time()
            db.execute("INSERT INTO reports (device, release, task, event, at, detail, bytes, retries) "
                       "VALUES (?,?,?,?,?,?,?,?)",
                       (device_id, release_id, task, event, now, detail[:500], size, retries))
            db.execute("UPDATE devices SET last_seen=? WHERE id=?", (now, device_id))
            outcome = "promoted" if event == "promoted" else "failed" if event in FAILED_EVENTS else None
            if outcome and release_id is not None:
                db.execute("INSERT INTO outcomes (device, release, outcome, at) VALUES (?,?,?,?) ON CONFLICT "
                           "(device, release) DO UPDATE SET outcome=excluded.outcome, at=excluded.at",
                           (device_id, release_id, outcome, now))
                row = db.execute("SELECT * FROM releases WHERE id=?", (release_id,)).fetchone()
                if row is not None and row["state"] == "rolling":
                    self._advance(db, Release.from_row(row))
        self._tx(report)

    def transfer(self, release_id: int) -> dict:
        """Bytes devices reported downloading for a release, and their retries (failed downloads too)."""
        row = self._one("SELECT COUNT(DISTINCT device) AS devices, COALESCE(SUM(bytes), 0) AS bytes "
                        "FROM reports WHERE release=? AND event='downloaded'", (release_id,))
        retries = self._one("SELECT COALESCE(SUM(retries), 0) AS retries FROM reports WHERE release=?",
                            (release_id,))["retries"]
        return {"devices": int(row["devices"]), "bytes": int(row["bytes"]), "retries": int(retries)}

    def status(self) -> dict:
        """``petah hub status`` / ``GET /v1/releases``: every release with its stage and counts, and the devices."""
        return self.db.transaction(lambda _db: self._status(), write=False)  # one consistent picture

    def _status(self) -> dict:
        releases = []
        for release in self.releases():
            releases.append({"id": release.id, "task": release.task, "kind": release.kind,
                             "to_backbone": release.to_backbone and release.to_backbone[:16],
                             "members": release.members, "backbone": release.backbone[:16],
                             "version": release.sha256[:12], "sha256": release.sha256, "target": release.target,
                             "bytes": release.bytes, "state": release.state,
                             "stage": release.stage, "stages": release.stages, "percent": release.percent,
                             "min_healthy": release.min_healthy, "max_failed": release.max_failed,
                             "min_score": release.min_score, "created": release.created,
                             "stage_times": release.stage_times, "counts": self.stage_counts(release),
                             "transfer": self.transfer(release.id), "failures": self.failures(release.id),
                             "history": self.stage_history(release.id)})
        devices = self.devices()
        drifting: dict[str, list[str]] = {}
        for device in devices:
            for task, summary in device["drift"].items():
                if summary.get("state") == "drifting":
                    drifting.setdefault(task, []).append(device["id"])
        return {"releases": releases, "devices": devices, "drifting": drifting}


__all__ = ["ACTIVE", "EVENTS", "OPERATIONS", "Registry", "Release", "check_rollout", "stage_rank", "token_hash"]
