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
from petah.fleet.ids import check_device_id
from petah.fleet.metadata import Repository, parse_metadata, signer, target_path, verify_role
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

    def publish(self, package: bytes, targets_metadata: bytes, settings: dict) -> dict:
        """A release: the package, the next targets metadata (signed by the release key, naming the
        package), rollout settings. The cheap checks (settings, the signature, the package's hash
        against its signed entry) come before the package is parsed; nothing is written unless all
        pass."""
        import hashlib

        from petah.packages import read_package

        stages = settings.get("stages", [10, 50, 100])
        if not isinstance(stages, list) or not all(type(s) is int for s in stages):
            raise PetahError("stages must be a list of whole percents")
        min_healthy, max_failed = (finite_number(settings, "min_healthy", 0.9),
                                   finite_number(settings, "max_failed", 0.2))
        min_score = finite_number(settings, "min_score", None)
        check_rollout(stages, min_healthy, max_failed)
        new = parse_metadata(targets_metadata, "targets", "the uploaded targets metadata")
        verify_role(self.repository.latest("root"), "targets", new, "the uploaded targets metadata")
        sha = hashlib.sha256(package).hexdigest()
        named = [p for p, info in new.signed.targets.items() if info.hashes.get("sha256") == sha]
        if not named:
            raise PetahError("the targets metadata does not name the uploaded package (by its sha256)")
        path = named[0]
        custom = new.signed.targets[path].unrecognized_fields.get("custom")
        if not isinstance(custom, dict):
            raise PetahError(f"target {path} carries no custom fields (task, backbone)")
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
        with self.repository.locked():  # hubs sharing the root (and its database) publish one at a time
            if any(r.sha256 == sha and r.state in ACTIVE for r in self.registry.releases()):
                raise PetahError(f"version {sha[:12]} is already released and active")
            self.repository.accept_targets(targets_metadata, {path: package})
            release = self.registry.add_release(manifest.task.name, manifest.backbone.fingerprint, sha, path,
                                                len(package), stages, min_healthy, max_failed, min_score)
        return {"release": release.id, "target": path, "version": sha[:12]}

    def withdraw(self, release_id: int, targets_metadata: bytes) -> dict:
        """Withdraw a release by hand: the next targets metadata (release key) without its target."""
        release = self.registry.release(release_id)
        new = parse_metadata(targets_metadata, "targets", "the uploaded targets metadata").signed
        if release.target in new.targets:
            raise PetahError(f"the targets metadata still names {release.target}")
        with self.repository.locked():
            self.repository.accept_targets(targets_metadata, {})
            self.registry.set_state(release_id, "withdrawn")
        return {"release": release_id, "state": "withdrawn"}


__all__ = ["DirectorUnavailable", "Hub", "add_device"]
