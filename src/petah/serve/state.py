"""The station's state folder: which package serves each task, and the one before it.

Layout::

    STATE/station.json              {"format": 1, "backbone": FINGERPRINT,
                                     "tasks": {NAME: {"sha256", "previous", "loaded_at"}}}
    STATE/packages/SHA256.petah     every package a task or its rollback refers to
    STATE/backbones/FP/             a backbone a fleet release installed (``device/``: its folder) and
                                    its own station.json + packages/ (the tasks adapted on it)
    STATE/active-backbone.json      which backbone serves (``current``) and the one before it
                                    (``previous``), each {"fingerprint", "folder", "weights"}

A package file is named by the sha256 of its bytes and written atomically before ``station.json``
names it; ``station.json`` itself is replaced atomically. So a process killed at any moment leaves
either the old set or the new one, never a mix.

The folder may be one a person shares with other files (a project folder that has a ``packages/``
of its own): petah only ever removes what it can prove it wrote — its own temp files, and
``SHA256.petah`` files whose bytes hash to their name — and never follows a symlink.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import stat
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from petah.errors import BackboneMismatch, PetahError, PetahWarning
from petah.files import atomic_write_bytes, inside
from petah.packages import check_task_name, read_manifest

STATE_FORMAT = 1
SHA256 = re.compile(r"[0-9a-f]{64}")
STORED = re.compile(r"([0-9a-f]{64})\.petah")
# the temp names atomic_write_bytes gives station.json and stored packages (mkstemp's 8 characters)
TEMP = re.compile(r"\.(station\.json|[0-9a-f]{64}\.petah)\.[A-Za-z0-9_]{8}\.tmp")


class StateUnwritable(PetahError):
    """The state dir refused a write (read-only, full): the change is refused, nothing changed (503)."""


@dataclass
class Entry:
    sha256: str
    previous: str | None
    loaded_at: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_entries(file: Path, fingerprint: str) -> dict[str, Entry]:
    """A state file's entries, validated (untrusted: a person may have edited it); reads only."""
    if not file.exists():
        return {}
    where = f"state file {file}"
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PetahError(f"{where} cannot be read ({type(exc).__name__}); move it away to start empty") from None
    if not isinstance(raw, dict) or raw.get("format") != STATE_FORMAT or not isinstance(raw.get("tasks"), dict):
        raise PetahError(f"{where} is not a petah station state (format {STATE_FORMAT})")
    if raw.get("backbone") != fingerprint:
        raise BackboneMismatch(f"{where} belongs to backbone fingerprint {str(raw.get('backbone'))[:16]}…, but "
                               f"this station runs {fingerprint[:16]}…; use another --state-dir")
    entries = {}
    for name, item in raw["tasks"].items():
        check_task_name(name, where)
        if not isinstance(item, dict) or not SHA256.fullmatch(str(item.get("sha256"))):
            raise PetahError(f"{where}: task {name!r} has no valid sha256")
        previous = item.get("previous")
        if previous is not None and not SHA256.fullmatch(str(previous)):
            raise PetahError(f"{where}: task {name!r} has an invalid previous sha256")
        entries[name] = Entry(item["sha256"], previous, str(item.get("loaded_at", "")))
    return entries


def _is_regular(path: Path) -> bool:
    """A plain file, not a symlink (lstat: a link is never followed, wherever it points)."""
    try:
        return stat.S_ISREG(path.lstat().st_mode)
    except OSError:
        return False


def _unwritable(exc: OSError) -> StateUnwritable:
    """A client-facing reason for a failed write: what happened, never where (no server path)."""
    reason = {errno.EROFS: "it is on a read-only file system", errno.ENOSPC: "its disk is full",
              errno.EDQUOT: "its disk quota is used up", errno.EACCES: "this process may not write there",
              errno.EPERM: "this process may not write there"}.get(exc.errno, exc.strerror or type(exc).__name__)
    return StateUnwritable(f"the station's state dir cannot be written ({reason}): the change is refused and the "
                           "served set is unchanged")


class StateDir:
    def __init__(self, root: str | Path, backbone_fingerprint: str):
        self.root = Path(root)
        self.packages = self.root / "packages"
        self.file = self.root / "station.json"
        self.fingerprint = backbone_fingerprint
        if self.packages.is_symlink():  # never follow it: its target's files are not the station's
            raise PetahError(f"state dir {self.root}: packages/ is a symlink; petah keeps its package files in a "
                             "real folder of the state dir (move the link away)")
        if self.packages.exists() and not self.packages.is_dir():
            raise PetahError(f"state dir {self.root}: packages is not a folder")
        try:
            self.packages.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PetahError(f"state dir {self.root}: cannot create it ({exc.strerror})") from None
        self.entries = read_entries(self.file, self.fingerprint)
        self.rebuilt = False
        if not self.file.exists():
            self.entries = self._rebuild()
            self.rebuilt = bool(self.entries)
        self._sweep()

    # --- what petah wrote ----------------------------------------------------------------------
    def stored(self) -> dict[str, Path]:
        """Package files petah stored: ``SHA256.petah`` plain files whose bytes hash to their name
        (a file of that shape a person put there with other bytes is theirs, and is left alone)."""
        found = {}
        for path in self.packages.iterdir():
            match = STORED.fullmatch(path.name)
            if match and _is_regular(path):
                try:
                    if sha256_file(path) == match.group(1):
                        found[match.group(1)] = path
                except OSError:
                    continue
        return found

    def _rebuild(self) -> dict[str, Entry]:
        """``station.json`` is gone but stored packages are here (a person deleted it, a disk lost
        it): serve them again rather than drop them — per task the newest file, the one before it
        as its rollback. Said in a warning; packages of another backbone are left on disk."""
        by_task: dict[str, list[tuple[float, str]]] = {}
        for sha, path in self.stored().items():
            try:
                manifest = read_manifest(path)
            except Exception:  # noqa: BLE001 - an unreadable stored file is left where it is
                continue
            if manifest.backbone.fingerprint == self.fingerprint:
                by_task.setdefault(manifest.task.name, []).append((path.stat().st_mtime, sha))
        entries = {}
        for name, versions in sorted(by_task.items()):
            versions.sort(reverse=True)
            entries[name] = Entry(versions[0][1], versions[1][1] if len(versions) > 1 else None, "")
        if entries:
            warnings.warn(f"state dir {self.root}: station.json is missing; serving the {len(entries)} task(s) its "
                          f"stored packages hold, the newest version of each ({', '.join(entries)}); delete "
                          "packages/ too to start empty", PetahWarning, stacklevel=3)
        return entries

    def _sweep(self) -> None:
        """Remove what an interrupted write left: petah's temp files and stored packages no entry
        names. Never anything else; a failure to remove only costs disk (a read-only state dir)."""
        keep = {s for e in self.entries.values() for s in (e.sha256, e.previous) if s}
        doomed = [p for p in list(self.root.iterdir()) + list(self.packages.iterdir())
                  if TEMP.fullmatch(p.name) and _is_regular(p)]
        doomed += [path for sha, path in self.stored().items() if sha not in keep]
        for path in doomed:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass

    # --- writing ---------------------------------------------------------------------------------
    def package_path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise PetahError(f"not a sha256: {sha256!r}")
        return inside(self.packages, f"{sha256}.petah")

    def store(self, data: bytes) -> tuple[str, Path]:
        """Keep a package's bytes under their sha256 (atomically; an existing copy is reused)."""
        sha = sha256_bytes(data)
        path = self.package_path(sha)
        if not (_is_regular(path) and sha256_file(path) == sha):
            try:
                atomic_write_bytes(path, data)
            except OSError as exc:
                raise _unwritable(exc) from None
        return sha, path

    def commit(self, entries: dict[str, Entry]) -> None:
        """Make ``entries`` the installed set (one atomic replace), then drop unreferenced packages."""
        payload = {"format": STATE_FORMAT, "backbone": self.fingerprint,
                   "tasks": {name: asdict(entry) for name, entry in sorted(entries.items())}}
        try:
            atomic_write_bytes(self.file, (json.dumps(payload, indent=1) + "\n").encode())
        except OSError as exc:
            raise _unwritable(exc) from None
        self.entries = dict(entries)
        self._sweep()


ACTIVE_FILE = "active-backbone.json"


def backbone_state_root(home: Path, fingerprint: str) -> Path:
    """Where the tasks of a backbone live: ``home/backbones/FP`` for one a release installed, else
    ``home`` (the backbone the station was first started on)."""
    if not SHA256.fullmatch(fingerprint):
        raise PetahError(f"not a backbone fingerprint: {fingerprint[:80]!r}")
    installed = home / "backbones" / fingerprint
    return installed if (installed / "station.json").is_file() else home


def installed_backbone_folder(home: Path, fingerprint: str) -> Path:
    """Where a release's backbone folder is kept (``petah.device.bundle.unpack_device_backbone``)."""
    if not SHA256.fullmatch(fingerprint):
        raise PetahError(f"not a backbone fingerprint: {fingerprint[:80]!r}")
    return home / "backbones" / fingerprint / "device"


@dataclass
class BackboneRecord:
    """A backbone a station served: its fingerprint, its device folder and weights file (None: the
    folder's own). Kept so a restart, or a roll back after the backbone was freed, loads it again."""

    fingerprint: str
    folder: str | None
    weights: str | None = None

    @classmethod
    def of(cls, backbone) -> BackboneRecord:
        """The record of a loaded backbone (a torch backbone has no folder to load it from again)."""
        folder = getattr(backbone, "path", None)
        return cls(backbone.fingerprint, str(Path(folder).resolve()) if folder is not None else None,
                   getattr(backbone, "weights_file", None))


def read_active(home: Path) -> tuple[BackboneRecord, BackboneRecord | None] | None:
    """The state dir's current and previous backbone (None where no release changed the backbone)."""
    file = home / ACTIVE_FILE
    if not file.exists():
        return None
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
        records = [None if raw[k] is None else BackboneRecord(**raw[k]) for k in ("current", "previous")]
        for record in records:
            if record is not None and (not SHA256.fullmatch(record.fingerprint) or not all(
                    v is None or isinstance(v, str) for v in (record.folder, record.weights))):
                raise ValueError(record)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PetahError(f"state file {file} cannot be read ({type(exc).__name__}); it names the backbone a fleet "
                         "release installed") from None
    if records[0] is None:
        raise PetahError(f"state file {file} names no current backbone")
    return records[0], records[1]


def write_active(home: Path, current: BackboneRecord, previous: BackboneRecord | None) -> None:
    payload = {"format": STATE_FORMAT, "current": asdict(current), "previous": previous and asdict(previous)}
    try:
        atomic_write_bytes(home / ACTIVE_FILE, (json.dumps(payload, indent=1) + "\n").encode())
    except OSError as exc:
        raise _unwritable(exc) from None


__all__ = ["ACTIVE_FILE", "BackboneRecord", "Entry", "StateDir", "StateUnwritable", "backbone_state_root",
           "installed_backbone_folder", "read_active", "read_entries", "sha256_bytes", "write_active"]
