"""TUF update metadata for task releases, through python-tuf (``tuf.api.metadata``).

Roles and keys (all Ed25519 PEM files from ``petah keygen``):

- **root** — an offline key (kept off the hub). Signs ``N.root.json``: which keys hold which role.
  A station is provisioned with one trusted root (``--trust-root root.json``) and follows newer
  root versions only when each is signed by the keys of the one before (python-tuf's chain).
- **targets** — the release key, held by whoever publishes (``petah release --key``). Signs
  ``N.targets.json``: each task release's path, length, sha256 and custom fields (task,
  backbone fingerprint, minimum golden score). The hub cannot forge it.
- **snapshot** and **timestamp** — one online key kept in the hub's root folder
  (``keys/online.key``), re-signed by the hub: they pin the current targets version and expire
  quickly (a freeze is detected within the timestamp's lifetime).

A release target is named ``TASK/SHA256.petah`` (the package file's sha256) and, with consistent
snapshots, stored as ``targets/TASK/SHA256.SHA256.petah``; metadata as ``metadata/N.ROLE.json``
plus ``metadata/timestamp.json``. All of it is static files: any HTTP server or CDN can serve it.

Every metadata and target file the hub writes passes through one folder, ``incoming/`` under the
root: a temp file named ``petah-<16 hex>.tmp``, held under an exclusive ``flock`` while it is
written and checked, then renamed into place (or removed). A publish killed with ``kill -9``
leaves its temp file there, unlocked; the next ``Hub`` start removes exactly those
(``Repository.sweep_incoming``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import secrets
import threading
from pathlib import Path

from petah.errors import PetahError
from petah.files import atomic_write_bytes, fsync_folder, inside
from petah.fleet.assignments import FIELD as DIRECTOR_FIELD
from petah.fleet.assignments import director_entry
from petah.packages.signing import generate_keypair, load_private_key, load_public_key

SPEC_VERSION = "1.0.31"
# lifetimes: the timestamp is re-signed by the hub well before it expires (``Repository.refresh``)
EXPIRY = {"root": dt.timedelta(days=365), "targets": dt.timedelta(days=90),
          "snapshot": dt.timedelta(days=7), "timestamp": dt.timedelta(days=1)}
ONLINE_KEY = "keys/online"  # under the hub root: snapshot + timestamp signer
INCOMING = "incoming"  # under the hub root: the hub's temp files, and nothing else of petah's
STAGED_NAME = re.compile(r"petah-[0-9a-f]{16}\.tmp")  # the only names the start-up sweep removes


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def tuf_key(public_key):
    from securesystemslib.signer import SSlibKey

    return SSlibKey.from_crypto(public_key)


def signer(private_key_path: str | Path):
    """A python-tuf signer from a ``petah keygen`` private key."""
    from securesystemslib.signer import CryptoSigner

    key = load_private_key(private_key_path)
    return CryptoSigner(key, tuf_key(key.public_key()))


def target_path(task: str, sha256: str) -> str:
    return f"{task}/{sha256}.petah"


def backbone_target_path(sha256: str, replaces: str, tasks: dict[str, str]) -> str:
    """A backbone release's packed device backbone (its own extension: no task package is named so),
    named by what the release is: the same backbone released again over another backbone or with
    other tasks is another target (a target's signed fields never change)."""
    import hashlib
    import json

    release = json.dumps({"backbone": sha256, "replaces": replaces, "tasks": tasks}, sort_keys=True)
    return f"backbones/{hashlib.sha256(release.encode()).hexdigest()}.tar"


def parse_metadata(data: bytes, role: str, origin: str):
    """Untrusted bytes -> ``Metadata`` of ``role`` (one-line error otherwise)."""
    from tuf.api.metadata import Metadata

    from petah.http import MAX_JSON_DEPTH, json_too_deep

    if json_too_deep(data):  # python-tuf parses with json.loads, which recurses once per level
        raise PetahError(f"{origin}: not TUF metadata (nests deeper than {MAX_JSON_DEPTH} levels)")
    try:
        metadata = Metadata.from_bytes(data)
    except Exception as exc:  # python-tuf raises many types for malformed input
        raise PetahError(f"{origin}: not valid TUF metadata ({type(exc).__name__})") from None
    if metadata.signed.type != role:
        raise PetahError(f"{origin}: {metadata.signed.type} metadata where {role} was expected")
    return metadata


def verify_role(root, role: str, metadata, origin: str) -> None:
    """``metadata`` must carry a threshold of signatures by the keys the root metadata ``root``
    names for ``role``."""
    from tuf.api.exceptions import UnsignedMetadataError

    try:
        root.verify_delegate(role, metadata)
    except UnsignedMetadataError:
        raise PetahError(f"{origin}: not signed by the {role} key(s) it must be signed by") from None


class Repository:
    """The hub's metadata folder: writes root / targets as given (signed elsewhere), and signs
    snapshot and timestamp with the online key."""

    def __init__(self, root_dir: str | Path):
        self.root_dir = Path(root_dir)
        self.metadata_dir = self.root_dir / "metadata"
        self.targets_dir = self.root_dir / "targets"
        self.incoming_dir = self.root_dir / INCOMING
        online = self.root_dir / f"{ONLINE_KEY}.key"
        if not (self.metadata_dir / "timestamp.json").is_file() or not online.is_file():
            raise PetahError(f"{self.root_dir} is not a petah hub root (create one: petah hub init)")
        self._online = signer(online)
        # one writer at a time: a timestamp re-signed on a GET must not race a publish
        self._lock = threading.RLock()
        self._held = 0  # how deep this process holds the root's lock (re-entrant within one thread)

    # --- reading --------------------------------------------------------------------------------
    def latest(self, role: str):
        """The newest version of ``root`` or ``targets`` (both kept as N.ROLE.json)."""
        versions = sorted(int(p.name.split(".")[0]) for p in self.metadata_dir.glob(f"*.{role}.json")
                          if p.name.split(".")[0].isdigit())
        if not versions:
            raise PetahError(f"{self.metadata_dir}: no {role} metadata")
        path = self.metadata_dir / f"{versions[-1]}.{role}.json"
        return parse_metadata(path.read_bytes(), role, str(path))

    def current_targets(self) -> bytes:
        """The newest targets metadata as published (what ``petah release`` signs the next from)."""
        return self.file(f"{self.latest('targets').signed.version}.targets.json").read_bytes()

    def file(self, name: str) -> Path:
        """A metadata file by its public name (``timestamp.json``, ``3.targets.json``…)."""
        return inside(self.metadata_dir, name)

    # --- temp files -----------------------------------------------------------------------------
    # Why a lock and not an age threshold: a publish may run in another process on the same root
    # (a second ``hub serve``, ``hub rotate-key``) while a hub starts, and a slow upload can take
    # any time; a flock is held exactly as long as its process is alive and released by the kernel
    # when ``kill -9`` ends it, so the sweep removes a temp file if and only if nobody uses it.
    def _incoming(self) -> Path:
        folder = self.incoming_dir
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        if folder.is_symlink() or not folder.is_dir():
            raise PetahError(f"the hub root's {INCOMING}/ is a symlink or a file: petah keeps its temp files only "
                             f"in a folder of its own inside the root (move {INCOMING} away)")
        return folder

    @contextlib.contextmanager
    def staged(self, payload: bytes):
        """``payload`` in a new temp file of ``incoming/`` (written, fsync'd, locked while in use);
        yields its path; gone afterwards (removed, unless the caller renamed it into place)."""
        import fcntl

        folder = self._incoming()
        for _attempt in range(8):
            path = folder / f"petah-{secrets.token_hex(8)}.tmp"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a sweep holds it, deciding
            with contextlib.suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    break  # still ours: a sweep between open and flock would have unlinked it
            os.close(fd)
        else:
            raise PetahError(f"cannot create a temp file in the hub root's {INCOMING}/")
        try:
            with os.fdopen(os.dup(fd), "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # under the lock, so a sweep never sees the name unlocked
            os.close(fd)

    def _write(self, path: Path, payload: bytes) -> None:
        """Write ``path`` whole or not at all: staged in ``incoming/``, renamed over it (one file
        system: both are inside the root)."""
        with self.staged(payload) as staged:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, path)
            fsync_folder(path.parent)

    def sweep_init_stages(self) -> list[str]:
        """Remove the staging folder an init killed after its commit left (``.init-<16 hex>``: the
        hub exists, so no init can still be running in it). Returns the names removed."""
        import shutil

        removed = []
        for entry in self.root_dir.iterdir():
            if INIT_STAGE.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                removed.append(entry.name)
        return removed

    @contextlib.contextmanager
    def locked(self):
        """The root's lock, for a change that must not interleave with another's — across the
        threads of this process and across processes on one root (hubs sharing it, rotate-key):
        ``incoming/hub.lock`` under flock, released by the kernel when a holder dies."""
        import fcntl

        with self._lock:
            if self._held:
                self._held += 1
                try:
                    yield
                finally:
                    self._held -= 1
                return
            fd = os.open(self._incoming() / "hub.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._held = 1
                try:
                    yield
                finally:
                    self._held = 0
            finally:
                os.close(fd)  # releases the flock

    def finish_rotation(self) -> bool:
        """Apply a key rotation ``rotate_targets_key`` journaled and was killed in: the new root,
        then the re-signed targets, each only if not applied yet; the journal removed last.
        Whether there was one."""
        import base64
        import json

        journal_path = self.incoming_dir / ROTATION
        if not journal_path.is_file() or journal_path.is_symlink():
            return False
        with self.locked():
            if not journal_path.is_file():
                return False  # another process finished it meanwhile
            journal = json.loads(journal_path.read_bytes())
            root, targets = base64.b64decode(journal["root"]), base64.b64decode(journal["targets"])
            root_applied = (parse_metadata(root, "root", "the journaled root").signed.version
                            <= self.latest("root").signed.version)
            new_targets = parse_metadata(targets, "targets", "the journaled targets").signed.version
            if not root_applied and new_targets <= self.latest("targets").signed.version:
                pass  # targets moved on under the old key since it was journaled: the rotation never happened
            else:
                if not root_applied:
                    self.accept_root(root)
                if new_targets > self.latest("targets").signed.version:
                    self._accept_targets(targets, {})
                self._refresh(False, None)  # killed between the targets and their snapshot: snapshot them now
            os.unlink(journal_path)
            fsync_folder(self.incoming_dir)
        return True

    def sweep_incoming(self) -> list[str]:
        """Remove what killed writers left in ``incoming/``: regular files named
        ``petah-<16 hex>.tmp`` that no live process holds locked. Anything else there (other names,
        symlinks, folders) is kept, and nothing outside the folder is looked at. Returns the
        names removed."""
        import fcntl
        import stat

        if not os.path.lexists(self.incoming_dir):
            return []
        removed = []
        with os.scandir(self._incoming()) as entries:
            for entry in entries:
                if not STAGED_NAME.fullmatch(entry.name) or not entry.is_file(follow_symlinks=False):
                    continue
                try:  # O_NOFOLLOW / O_NONBLOCK: swapped for a symlink or a FIFO meanwhile, it fails or is skipped
                    fd = os.open(entry.path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
                except OSError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    status = os.fstat(fd)
                    if stat.S_ISREG(status.st_mode) and os.path.samestat(status, os.lstat(entry.path)):
                        os.unlink(entry.path)
                        removed.append(entry.name)
                except OSError:  # BlockingIOError: a live writer holds it
                    pass
                finally:
                    os.close(fd)
        return removed

    # --- writing --------------------------------------------------------------------------------
    def accept_targets(self, data: bytes, packages: dict[str, bytes]) -> object:
        with self.locked():
            return self._accept_targets(data, packages)

    def _accept_targets(self, data: bytes, packages: dict[str, bytes]) -> object:
        """A targets metadata signed by the release key: checked against the current root and
        version, every new target's bytes checked against its recorded hash, then published (the
        package files first, then the metadata, then snapshot + timestamp)."""
        new = parse_metadata(data, "targets", "the uploaded targets metadata")
        verify_role(self.latest("root"), "targets", new, "the uploaded targets metadata")
        current = self.latest("targets").signed
        if new.signed.version != current.version + 1:
            raise PetahError(f"the uploaded targets metadata has version {new.signed.version}; the hub is at "
                             f"{current.version} (publish version {current.version + 1}: someone released meanwhile?)")
        if new.signed.expires <= _utcnow():
            raise PetahError("the uploaded targets metadata has already expired")
        for path, info in new.signed.targets.items():
            if path in current.targets:
                if current.targets[path].to_dict() != info.to_dict():
                    raise PetahError(f"target {path} changed its recorded length or hash; publish a new release")
                continue
            if path not in packages:
                raise PetahError(f"target {path} is new but its package was not uploaded")
            try:
                info.verify_length_and_hashes(packages[path])
            except Exception:
                raise PetahError(f"target {path}: the uploaded package does not match its recorded hash") from None
            sha = info.hashes["sha256"]
            directory, _, base = path.rpartition("/")
            self._write(inside(self.targets_dir, directory, f"{sha}.{base}"), packages[path])
        self._write(self.file(f"{new.signed.version}.targets.json"), data)
        self.refresh(force=True)
        return new.signed

    def accept_root(self, data: bytes) -> None:
        """A new root version, signed by the old root's keys and its own (a key rotation)."""
        new = parse_metadata(data, "root", "the uploaded root metadata")
        old = self.latest("root")
        verify_role(old, "root", new, "the new root (by the old root's keys)")
        verify_role(new, "root", new, "the new root (by its own keys)")
        if new.signed.version != old.signed.version + 1:
            raise PetahError(f"the new root must be version {old.signed.version + 1}, got {new.signed.version}")
        self._write(self.file(f"{new.signed.version}.root.json"), data)

    def refresh(self, force: bool = False, lifetime: dict | None = None) -> bool:
        """Re-sign snapshot (when targets moved) and timestamp (when either moved, or half its
        lifetime has passed). Returns whether anything was written."""
        with self.locked():
            return self._refresh(force, lifetime)

    def _refresh(self, force: bool, lifetime: dict | None) -> bool:
        from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

        lifetime = {**EXPIRY, **(lifetime or {})}
        now = _utcnow()
        targets_version = self.latest("targets").signed.version
        stamp = parse_metadata(self.file("timestamp.json").read_bytes(), "timestamp", "timestamp.json").signed
        snap_version = stamp.snapshot_meta.version
        snap_path = self.file(f"{snap_version}.snapshot.json")
        snapshot = parse_metadata(snap_path.read_bytes(), "snapshot", snap_path.name).signed
        stale = snapshot.meta["targets.json"].version != targets_version or snapshot.expires - now < lifetime[
            "snapshot"] / 2
        if not (force or stale or stamp.expires - now < lifetime["timestamp"] / 2):
            return False
        if stale or force:
            snap_version += 1
            snap = Metadata(Snapshot(snap_version, SPEC_VERSION, now + lifetime["snapshot"],
                                     {"targets.json": MetaFile(targets_version)}))
            snap.sign(self._online)
            self._write(self.file(f"{snap_version}.snapshot.json"), snap.to_bytes())
        timestamp = Metadata(Timestamp(stamp.version + 1, SPEC_VERSION, now + lifetime["timestamp"],
                                       MetaFile(snap_version)))
        timestamp.sign(self._online)
        self._write(self.file("timestamp.json"), timestamp.to_bytes())
        return True


INIT_STAGE = re.compile(r"\.init-[0-9a-f]{16}")  # a hub init's staging folder under the root
ROTATION = "rotation.json"  # in incoming/: a key rotation's two files, written before either is applied


def public_key_of(path: str | Path):
    """The public key of a ``petah keygen`` file: ``NAME.pub``, or derived from ``NAME.key``."""
    path = Path(path)
    return load_private_key(path).public_key() if path.suffix == ".key" else load_public_key(path)


def init_repository(root_dir: str | Path, root_key: str | Path, release_key: str | Path,
                    director_key: str | Path | None = None) -> Path:
    """A new hub root: ``1.root.json`` signed by the offline root key (roles: root -> that key,
    targets -> the release key, snapshot + timestamp -> a new online key written under the hub
    root; with ``director_key`` (its .pub or .key), that key as the signer of per-device
    assignments, ``petah.fleet.assignments``), an empty ``1.targets.json`` signed by the release
    key, first snapshot and timestamp. Returns the path of ``1.root.json``: the trusted root to
    provision stations with.

    Crash-atomic: everything is made in ``ROOT/.init-<16 hex>/``, the online key moved into
    ``keys/``, then the whole ``metadata/`` folder renamed into place — the one step that makes
    the folder a hub. Killed before it, there is no hub and init runs again (removing the killed
    run's staging folder); after it, a whole one."""
    import shutil

    from tuf.api.metadata import Metadata, MetaFile, Role, Root, Snapshot, Targets, Timestamp

    root_dir = Path(root_dir)
    if (root_dir / "metadata").exists():
        raise PetahError(f"{root_dir} already holds hub metadata; init never overwrites it")
    root_signer, release_signer = signer(root_key), signer(release_key)
    director = director_entry(tuf_key(public_key_of(director_key))) if director_key is not None else None
    root_dir.mkdir(parents=True, exist_ok=True)
    for leftover in root_dir.iterdir():
        if INIT_STAGE.fullmatch(leftover.name) and leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)  # a killed init's (no hub refers to anything in it)
    stage = root_dir / f".init-{secrets.token_hex(8)}"
    (stage / "metadata").mkdir(parents=True)
    (stage / "keys").mkdir()
    generate_keypair(stage / ONLINE_KEY)
    online = signer(stage / f"{ONLINE_KEY}.key")
    online_key = tuf_key(load_public_key(stage / f"{ONLINE_KEY}.pub"))
    now = _utcnow()
    root = Root(1, SPEC_VERSION, now + EXPIRY["root"], consistent_snapshot=True)
    for role, key in (("root", root_signer.public_key), ("targets", release_signer.public_key),
                      ("snapshot", online_key), ("timestamp", online_key)):
        root.roles.setdefault(role, Role([], 1))
        root.add_key(key, role)
    if director is not None:
        root.unrecognized_fields[DIRECTOR_FIELD] = director
    files = {}
    root_md = Metadata(root)
    root_md.sign(root_signer)
    files["1.root.json"] = root_md.to_bytes()
    targets = Metadata(Targets(1, SPEC_VERSION, now + EXPIRY["targets"]))
    targets.sign(release_signer)
    files["1.targets.json"] = targets.to_bytes()
    snapshot = Metadata(Snapshot(1, SPEC_VERSION, now + EXPIRY["snapshot"], {"targets.json": MetaFile(1)}))
    snapshot.sign(online)
    files["1.snapshot.json"] = snapshot.to_bytes()
    timestamp = Metadata(Timestamp(1, SPEC_VERSION, now + EXPIRY["timestamp"], MetaFile(1)))
    timestamp.sign(online)
    files["timestamp.json"] = timestamp.to_bytes()
    for name, data in files.items():
        atomic_write_bytes(stage / "metadata" / name, data)
    (root_dir / "targets").mkdir(exist_ok=True)
    keys = root_dir / Path(ONLINE_KEY).parent
    keys.mkdir(exist_ok=True)
    for suffix in (".key", ".pub"):  # a killed init's key here is replaced: no metadata names it
        os.replace(stage / f"{ONLINE_KEY}{suffix}", root_dir / f"{ONLINE_KEY}{suffix}")
    fsync_folder(keys)
    os.replace(stage / "metadata", root_dir / "metadata")  # the commit
    fsync_folder(root_dir)
    shutil.rmtree(stage)
    return root_dir / "metadata" / "1.root.json"


def release_targets(current: bytes, key: str | Path, add: dict[str, tuple[bytes, dict]] = (),
                    remove: tuple[str, ...] = (), expires: dt.timedelta = EXPIRY["targets"],
                    current_signed_by=None) -> bytes:
    """The next targets metadata, signed by the release key: ``current`` plus ``add`` (path ->
    (package bytes, custom fields)) minus ``remove``. ``current`` must verify against the root
    metadata ``current_signed_by`` (default: be signed by this same key)."""
    from tuf.api.metadata import Metadata, Root, TargetFile

    metadata = parse_metadata(current, "targets", "the hub's targets metadata")
    release_signer = signer(key)
    if current_signed_by is None:
        own = Root()
        own.add_key(release_signer.public_key, "targets")
        current_signed_by = Metadata(own)
    # sign on top of nothing this key did not sign itself: a hub cannot slip a target in
    verify_role(current_signed_by, "targets", metadata, "the hub's current targets metadata (by this release key)")
    targets = metadata.signed
    for path in remove:
        if path not in targets.targets:
            raise PetahError(f"the hub's targets metadata has no target {path}")
        del targets.targets[path]
    for path, (data, custom) in dict(add).items():
        info = TargetFile.from_data(path, data, ["sha256"])
        info.unrecognized_fields = {"custom": custom}
        targets.targets[path] = info
    targets.version += 1
    targets.expires = _utcnow() + expires
    metadata.signatures.clear()
    metadata.sign(release_signer)
    return metadata.to_bytes()


def rotate_targets_key(root_dir: str | Path, root_key: str | Path, new_release_key: str | Path) -> int:
    """Hand the targets role to ``new_release_key`` alone: a new root version signed by the
    (unchanged) offline root key, then the current targets re-signed by the new key. Stations
    follow both on their next refresh. Returns the root version that names the new key.

    Crash-atomic: both files are signed first and written together to ``incoming/rotation.json``
    (one durable write), then applied; a rotation killed after that is finished by the next hub
    start or ``rotate-key`` (``Repository.finish_rotation``), one killed before it never happened."""
    repository = Repository(root_dir)
    repository.finish_rotation()
    with repository.locked():  # no publish of a running hub between reading the targets and the journal
        return _rotate(repository, root_key, new_release_key)


def rotate_director_key(root_dir: str | Path, root_key: str | Path, new_director_key: str | Path) -> int:
    """Name a new director key (its .pub or .key) in a new root version signed by the offline root
    key: the old director key is revoked for every station that refreshes its metadata (each does
    before acting on an assignment that changes anything). One file: atomic as it is. Returns the
    root version that names the new key."""
    repository = Repository(root_dir)
    repository.finish_rotation()
    entry = director_entry(tuf_key(public_key_of(new_director_key)))
    with repository.locked():
        metadata = repository.latest("root")
        root = metadata.signed
        if root.unrecognized_fields.get(DIRECTOR_FIELD, {}).get("keyid") == entry["keyid"]:
            return root.version
        root.unrecognized_fields[DIRECTOR_FIELD] = entry
        root.version += 1
        root.expires = _utcnow() + EXPIRY["root"]
        metadata.signatures.clear()
        metadata.sign(signer(root_key))
        repository.accept_root(metadata.to_bytes())
        return root.version


def _rotate(repository: Repository, root_key: str | Path, new_release_key: str | Path) -> int:
    import base64
    import json

    old_root = repository.latest("root")
    new_signer = signer(new_release_key)
    if old_root.signed.roles["targets"].keyids == [new_signer.public_key.keyid]:
        return old_root.signed.version  # done already (a rerun after a finished rotation)
    metadata = repository.latest("root")
    root = metadata.signed
    for keyid in list(root.roles["targets"].keyids):
        root.revoke_key(keyid, "targets")
    root.add_key(new_signer.public_key, "targets")
    root.version += 1
    root.expires = _utcnow() + EXPIRY["root"]
    metadata.signatures.clear()
    metadata.sign(signer(root_key))
    targets = release_targets(repository.current_targets(), new_release_key, current_signed_by=old_root)
    journal = {"root": base64.b64encode(metadata.to_bytes()).decode(), "targets": base64.b64encode(targets).decode()}
    repository.incoming_dir.mkdir(exist_ok=True)
    atomic_write_bytes(repository.incoming_dir / ROTATION, json.dumps(journal).encode())
    repository.finish_rotation()
    return root.version


__all__ = ["EXPIRY", "Repository", "backbone_target_path", "init_repository", "parse_metadata", "public_key_of",
           "release_targets", "rotate_director_key", "rotate_targets_key", "signer", "target_path", "tuf_key",
           "verify_role"]
