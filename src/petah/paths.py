"""Output paths checked before any work: a run must not train for minutes and then fail to write.

Low in the tree on purpose (imports nothing from petah but ``petah.errors``), so every writer
can call it.
"""

from __future__ import annotations

import os
from pathlib import Path

from petah.errors import PetahError


def check_writable(path: str | Path) -> Path:
    """Refuse an output file petah could not write; return it as a ``Path``.

    Missing parent folders are fine (writers create them), but the nearest existing ancestor must
    be a folder this process may write into, and the path itself must not be a folder.
    """
    path = Path(path)
    if path.is_dir():
        raise PetahError(f"cannot write {path}: it is a folder; name a file")
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:  # a root that does not exist (another drive): nothing to test
            return path
        parent = parent.parent
    if not parent.is_dir():
        raise PetahError(f"cannot write {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PetahError(f"cannot write {path}: no permission to write in {parent}")
    return path


__all__ = ["check_writable"]
