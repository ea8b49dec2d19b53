"""Device ids: the one format the hub, the station's settings and the update agent agree on.

Standard library only: ``petah serve --device-id`` is checked with it, and the station must not
import the hub (its FastAPI app and SQLite registry) for that.
"""

from __future__ import annotations

import re

from petah.errors import PetahError

DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def check_device_id(device_id: str) -> str:
    """``device_id`` when it is 1-64 characters of A-Z a-z 0-9 . _ - (the agent puts it into URL
    paths), else a ``PetahError`` naming it."""
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise PetahError(f"device id {device_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    return device_id


BACKBONE = "@backbone"  # a backbone release: its task column and its key in a poll answer (no task name has @)


__all__ = ["BACKBONE", "DEVICE_ID", "check_device_id"]
