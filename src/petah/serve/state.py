"""The station's state folder: which package serves each task, and the one before it.

Layout::

    STATE/station.json              {"format": 1, "backbone": FINGERPRINT,
                                     "tasks": {NAME: {"sha256", "previous", "loaded_at"}}}
    STATE/packages/SHA256.petah     every package a task or its rollback refers to

A package file is named by the sha256 of its bytes and written atomically before ``station.json``
names it; ``station.json`` itself is replaced atomically. So a process killed at any moment leaves
either the old set or the new one, never a mix: on the next start, temp files and packages no
entry names are removed.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from petah.errors import BackboneMismatch, PetahError
from petah.files import atomic_write_bytes, inside
from petah.packages import check_task_name

STATE_FORMAT = 1
SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class Entry:
    sha256: str
    previous: str | None
    loaded_at: str


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


class StateDir:
    def __init__(self, root: str | Path, backbone_fingerprint: str):
        self.root = Path(root)
        self.packages = self.root / "packages"
        self.file = self.root / "station.json"
        self.fingerprint = backbone_fingerprint
        try:
            self.packages.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PetahError(f"state dir {self.root}: cannot create it ({exc.strerror})") from None
        self.entries = read_entries(self.file, self.fingerprint)
        self._sweep()

    def _sweep(self) -> None:
        """Remove what an interrupted write left: temp files and packages no entry names."""
        keep = {e.sha256 for e in self.entries.values()} | {e.previous for e in self.entries.values() if e.previous}
        for path in list(self.root.glob(".*.tmp")) + list(self.packages.iterdir()):
            if path.is_file() and (path.name.endswith(".tmp") or path.stem not in keep):
                path.unlink(missing_ok=True)

    # --- writing ---------------------------------------------------------------------------------
    def package_path(self, sha256: str) -> Path:
        if not SHA256.fullmatch(sha256):
            raise PetahError(f"not a sha256: {sha256!r}")
        return inside(self.packages, f"{sha256}.petah")

    def store(self, data: bytes) -> tuple[str, Path]:
        """Keep a package's bytes under their sha256 (atomically; an existing copy is reused)."""
        sha = sha256_bytes(data)
        path = self.package_path(sha)
        if not path.exists():
            atomic_write_bytes(path, data)
        return sha, path

    def commit(self, entries: dict[str, Entry]) -> None:
        """Make ``entries`` the installed set (one atomic replace), then drop unreferenced packages."""
        payload = {"format": STATE_FORMAT, "backbone": self.fingerprint,
                   "tasks": {name: asdict(entry) for name, entry in sorted(entries.items())}}
        atomic_write_bytes(self.file, (json.dumps(payload, indent=1) + "\n").encode())
        self.entries = dict(entries)
        self._sweep()


__all__ = ["Entry", "StateDir", "read_entries", "sha256_bytes"]
