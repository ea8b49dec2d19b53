"""The hub: serves TUF metadata and release packages (static files), takes signed releases,
decides rollout stages and collects device reports. ``Hub`` does the work without HTTP; its API
is ``petah.fleet.hub_app`` (``petah hub serve``).

Layout of ``--root DIR``::

    metadata/N.root.json, N.targets.json, N.snapshot.json, timestamp.json   (TUF, python-tuf)
    targets/TASK/SHA256.SHA256.petah                                         (release packages)
    keys/online.key                  the online snapshot + timestamp key (created by ``hub init``)
    hub.db                           releases, devices, reports (SQLite, ``petah.fleet.registry``), or
                                     ``--db postgresql://…`` shared by several hub processes
    incoming/petah-<16 hex>.tmp      temp files of writes in progress; leftovers of a killed hub
                                     are removed at the next start (``Repository.sweep_incoming``)

Publishing needs no hub credential: an upload is accepted only with targets metadata signed by
the release key the trusted root names (the hub could not forge one). Devices authenticate with
their own bearer token (``petah hub add-device``).
"""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

from petah.errors import PetahError
from petah.fleet.assignments import Director
from petah.fleet.assignments import director_key as director_key_of
from petah.fleet.ids import BACKBONE, check_device_id
from petah.fleet.metadata import Repository, backbone_target_path, parse_metadata, signer, target_path, verify_role
from petah.fleet.registry import ACTIVE, Registry, check_rollout


def finite_number(settings: dict, key: str, default):
    """A rollout setting from an untrusted JSON object: a finite number (or the default)."""
    import math

    value = settings.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PetahError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def add_device(root: str | Path, device_id: str, token_file: str | Path, db: str | None = None) -> Path:
    """Register a device: a new random token written to ``token_file`` (mode 0600, never over a
    file), its hash kept by the hub (in ``db`` where the hub's tables are not ``ROOT/hub.db``)."""
    import os

    check_device_id(device_id)
    Repository(root)  # a hub root, or a clear error
    token_file = Path(token_file)
    if token_file.exists():
        raise PetahError(f"{token_file} exists; add-device never overwrites a token file")
    token = secrets.token_urlsafe(32)
    registry = Registry(db or Path(root) / "hub.db")
    try:
        registry.add_device(device_id, token)
    finally:
        registry.close()
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token_file


class DirectorUnavailable(PetahError):
    """This hub cannot sign assignments (its director key is no longer the one the root names)."""


class Hub:
    """What the endpoints call: the metadata repository and the registry, usable without HTTP.
    ``director_key``: the private key that signs each device's assignment, required exactly when
    the hub's root metadata names one (``petah.fleet.assignments``)."""

    def __init__(self, root: str | Path, db: str | None = None, director_key: str | Path | None = None):
        self.root = Path(root)
        self.repository = Repository(self.root)
        trusted = self.repository.latest("root").signed
        self._root_version = trusted.version
        self.director = None
        self.polls = 0
        self._count_lock = threading.Lock()
        if director_key is not None:
            self.director = Director(signer(director_key), director_key)
            self.director.check_named_by(trusted)
        elif director_key_of(trusted) is not None:
            raise PetahError("this hub's root metadata names a director key: start the hub with --director-key "
                             "(the director's .key file, kept outside the hub's folder and database)")
        self.repository.sweep_incoming()  # what a killed publish left (files petah names and no one holds)
        self.repository.sweep_init_stages()  # what an init killed after its commit left
        self.repository.finish_rotation()  # a key rotation killed half-way: finished, never left half
        self.repository.refresh()  # a publish killed between its targets and their snapshot: snapshotted
        self.registry = Registry(db or self.root / "hub.db")

    def poll(self, device_id: str, backbone: str, installed: dict[str, str], state: str,
             drift: dict[str, dict] | None = None) -> dict:
        """A device's check-in (``Registry.poll``), answered with its assignment signed by the
        director where the hub has one (then the answer is that alone: nothing unsigned to act on)."""
        if self.repository.file(f"{self._root_version + 1}.root.json").exists():
            trusted = self.repository.latest("root").signed  # the root moved on: is this still its director?
            named = director_key_of(trusted)
            if (named.keyid if named else None) != (self.director.keyid if self.director else None):
                # the details (which key file) are the operator's, in the hub's own start-up error
                raise DirectorUnavailable("the hub's root names another director key than this hub process "
                                          "holds (rotated): the operator must restart the hub with it")
            self._root_version = trusted.version
        answer = self.registry.poll(device_id, backbone, installed, state, drift)
        with self._count_lock:
            self.polls += 1
        counter = answer.pop("counter")
        if self.director is None:
            return answer
        return {"assignment": self.director.sign(device_id, backbone, counter, answer)}

    @staticmethod
    def _rollout(settings: dict) -> tuple[list[int], float, float, float | None]:
        stages = settings.get("stages", [10, 50, 100])
        if not isinstance(stages, list) or not all(type(s) is int for s in stages):
            raise PetahError("stages must be a list of whole percents")
        min_healthy, max_failed = (finite_number(settings, "min_healthy", 0.9),
                                   finite_number(settings, "max_failed", 0.2))
        min_score = finite_number(settings, "min_score", None)
        check_rollout(stages, min_healthy, max_failed)
        return stages, min_healthy, max_failed, min_score

    def _signed_targets(self, targets_metadata: bytes):
        new = parse_metadata(targets_metadata, "targets", "the uploaded targets metadata")
        verify_role(self.repository.latest("root"), "targets", new, "the uploaded targets metadata")
        return new.signed

    def _named(self, signed, data: bytes, what: str, new: bool = False) -> tuple[str, str, dict]:
        """The target path, sha256 and custom fields the signed targets give these bytes (``new``:
        a target the hub does not list yet: one backbone comes in several releases)."""
        import hashlib

        sha = hashlib.sha256(data).hexdigest()
        listed = self.repository.latest("targets").signed.targets if new else {}
        named = [p for p, info in signed.targets.items() if info.hashes.get("sha256") == sha and p not in listed]
        if not named:
            raise PetahError(f"the targets metadata does not name the uploaded {what} (by its sha256)")
        custom = signed.targets[named[0]].unrecognized_fields.get("custom")
        if not isinstance(custom, dict):
            raise PetahError(f"target {named[0]} carries no custom fields (task, backbone)")
        return named[0], sha, custom

    def _package_target(self, signed, package: bytes, backbone: str | None = None):
        """An uploaded package checked against its signed entry (and, given, the backbone it must be
        adapted on): its manifest, target path and sha256."""
        from petah.packages import read_package

        path, sha, custom = self._named(signed, package, "package")
        with self.repository.staged(package) as staged:
            try:
                manifest = read_package(staged).manifest
            except PetahError as exc:  # the client sees its upload named, never the temp file's path
                raise PetahError(f"the release package does not verify: "
                                 f"{str(exc).replace(str(staged), 'the upload')}") from None
        if path != target_path(manifest.task.name, sha):
            raise PetahError(f"the targets metadata names the package as {path}, not "
                             f"{target_path(manifest.task.name, sha)}")
        if custom.get("backbone") != manifest.backbone.fingerprint or custom.get("task") != manifest.task.name:
            raise PetahError("the targets metadata's task / backbone do not match the package's manifest")
        if backbone is not None and manifest.backbone.fingerprint != backbone:
            raise PetahError(f"package {manifest.task.name} was adapted on backbone "
                             f"{manifest.backbone.fingerprint[:16]}…, not on the released one {backbone[:16]}…")
        return manifest, path, sha

    def _check_new(self, shas: list[str]) -> None:
        active = {r.sha256 for r in self.registry.releases() if r.state in ACTIVE}
        for sha in shas:
            if sha in active:
                raise PetahError(f"version {sha[:12]} is already released and active")

    def publish(self, package: bytes, targets_metadata: bytes, settings: dict) -> dict:
        """A release: the package, the next targets metadata (signed by the release key, naming the
        package), rollout settings. The cheap checks (settings, the signature, the package's hash
        against its signed entry) come before the package is parsed; nothing is written unless all
        pass."""
        stages, min_healthy, max_failed, min_score = self._rollout(settings)
        signed = self._signed_targets(targets_metadata)
        manifest, path, sha = self._package_target(signed, package)
        with self.repository.locked():  # hubs sharing the root (and its database) publish one at a time
            self._check_new([sha])
            self.repository.accept_targets(targets_metadata, {path: package})
            release = self.registry.add_release(manifest.task.name, manifest.backbone.fingerprint, sha, path,
                                                len(package), stages, min_healthy, max_failed, min_score)
        return {"release": release.id, "target": path, "version": sha[:12]}

    def publish_backbone(self, backbone: bytes, packages: list[bytes], targets_metadata: bytes,
                         settings: dict) -> dict:
        """A backbone release: a packed device backbone (``petah.device.bundle``) and every task
        package adapted on it, all named by one targets version signed by the release key (the
        backbone's entry names the backbone it replaces and the tasks); staged as one release."""
        import tempfile

        from petah.device.bundle import unpack_device_backbone

        stages, min_healthy, max_failed, min_score = self._rollout(settings)
        signed = self._signed_targets(targets_metadata)
        path, sha, custom = self._named(signed, backbone, "backbone", new=True)
        fingerprint, replaces, tasks = custom.get("fingerprint"), custom.get("backbone"), custom.get("tasks")
        if custom.get("kind") != "backbone" or custom.get("task") != BACKBONE or not isinstance(tasks, dict) or \
                not all(isinstance(v, str) for v in (fingerprint, replaces)) or fingerprint == replaces:
            raise PetahError(f"target {path} is not a backbone release's entry (kind, fingerprint, the backbone it "
                             "replaces, tasks)")
        if path != backbone_target_path(sha, replaces, tasks):
            raise PetahError(f"the targets metadata names the backbone as {path}, not "
                             f"{backbone_target_path(sha, replaces, tasks)}")
        with tempfile.TemporaryDirectory(prefix="petah-backbone-") as folder:  # outside the hub root
            try:
                unpack_device_backbone(backbone, Path(folder) / "device", fingerprint)
            except PetahError as exc:
                raise PetahError(f"the backbone release does not verify: {str(exc).replace(folder, 'the upload')}"
                                 ) from None
        members, files = {}, {path: backbone}
        for package in packages:
            manifest, member_path, member_sha = self._package_target(signed, package, fingerprint)
            if manifest.task.name in members:
                raise PetahError(f"two packages of task {manifest.task.name}")
            members[manifest.task.name] = {"sha256": member_sha, "target": member_path}
            files[member_path] = package
        if {t: m["sha256"] for t, m in members.items()} != tasks:
            raise PetahError("the uploaded packages are not the tasks the backbone's signed entry names")
        if not members:
            raise PetahError("a backbone release carries every task adapted on it: no package was uploaded")
        with self.repository.locked():
            self._check_new([sha])
            self.repository.accept_targets(targets_metadata, files)
            release = self.registry.add_release(BACKBONE, replaces, sha, path, sum(map(len, files.values())),
                                                stages, min_healthy, max_failed, min_score,
                                                to_backbone=fingerprint, members=members)
        return {"release": release.id, "target": path, "version": sha[:12], "tasks": sorted(members)}

    def withdraw(self, release_id: int, targets_metadata: bytes) -> dict:
        """Withdraw a release by hand: the next targets metadata (release key) without its target."""
        release = self.registry.release(release_id)
        new = parse_metadata(targets_metadata, "targets", "the uploaded targets metadata").signed
        for path in [release.target, *(m["target"] for m in release.members.values())]:
            if path in new.targets:
                raise PetahError(f"the targets metadata still names {path}")
        with self.repository.locked():
            self.repository.accept_targets(targets_metadata, {})
            self.registry.set_state(release_id, "withdrawn")
        return {"release": release_id, "state": "withdrawn"}


__all__ = ["DirectorUnavailable", "Hub", "add_device"]
