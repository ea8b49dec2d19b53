"""Per-device assignments signed by a director key (the Uptane idea, fitted to petah).

The signed targets metadata says *which* releases exist (the release key); the hub's rollout
decides *which station runs which* — and that answer, left unsigned, is the hub's word alone:
whoever holds the hub's database or API could send any station any listed release, replay an
old answer, or tell stations to drop their tasks. With a director, every poll answer carries an
assignment the station checks before acting on it:

    {"signed": "<JSON text>", "signatures": [{"keyid": …, "sig": …}]}

whose text holds ``type`` (``petah-assignment``), ``device``, ``backbone``, ``counter`` (rises with
every answer to that device; a millisecond clock floor keeps it rising across a restored
database), ``expires`` (UTC, ISO 8601) and the answer itself (``desired``, ``withdrawn``). The
signature is Ed25519 over the exact bytes of the text (no canonical-JSON step to get wrong).

The director's public key is named by the TUF root metadata (a custom field of ``root.json``), so
it is provisioned with the trusted root, rotated or revoked only by the offline root key, and
followed by stations through python-tuf's root chain. The private key is a file of its own,
outside the hub's folder and database (``petah hub serve --director-key``). What each key can and
cannot do is the table in docs/deploy.md ("Keys and what a thief can do").
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from petah.errors import PetahError

FIELD = "x-petah-director"  # the root metadata's custom field naming the director key
TYPE = "petah-assignment"
LIFETIME = dt.timedelta(hours=1)  # an assignment is refused after this (a captured one cannot wait for a reset)
MAX_BYTES = 256 * 1024
CLOCK_SKEW = dt.timedelta(days=1)  # how far a hub's clock may run ahead of a station's


def director_entry(key) -> dict:
    """What the root metadata says of a director key (a securesystemslib key: its dict and keyid)."""
    return {"keyid": key.keyid, **key.to_dict()}


def director_key(root_signed):
    """The director key a root metadata names, or None (a hub without a director)."""
    from securesystemslib.signer import SSlibKey

    entry = root_signed.unrecognized_fields.get(FIELD)
    if entry is None:
        return None
    try:
        entry = dict(entry)
        return SSlibKey.from_dict(entry.pop("keyid"), entry)
    except Exception:  # a root signed by the root key, but malformed: no director can be trusted
        raise PetahError(f"the root metadata's {FIELD} is not a key") from None


class Director:
    """Signs assignments with the director's private key (a securesystemslib signer of the
    ``petah keygen`` file ``path``: ``petah.fleet.metadata.signer``)."""

    def __init__(self, signer, path: str | Path):
        self.path = Path(path)
        self._signer = signer
        self.keyid = signer.public_key.keyid

    def check_named_by(self, root_signed) -> None:
        named = director_key(root_signed)
        if named is None:
            raise PetahError("the hub's root metadata names no director key: create the hub with petah hub init "
                             "--director-key, or rotate one in (petah hub rotate-key --new-director-key)")
        if named.keyid != self.keyid:
            raise PetahError(f"--director-key {self.path.name} is not the director key the hub's root metadata "
                             f"names (keyid {named.keyid[:12]}…)")

    def sign(self, device: str, backbone: str, counter: int, answer: dict) -> dict:
        expires = (dt.datetime.now(dt.UTC) + LIFETIME).replace(microsecond=0)
        text = json.dumps({"type": TYPE, "device": device, "backbone": backbone, "counter": counter,
                           "expires": expires.isoformat().replace("+00:00", "Z"), **answer}, sort_keys=True)
        signature = self._signer.sign(text.encode())
        return {"signed": text, "signatures": [{"keyid": signature.keyid, "sig": signature.signature}]}


def verify(assignment, key, device: str, backbone: str, last_counter: int) -> dict:
    """An assignment from the hub (untrusted JSON) checked against the director ``key``: signed by
    it, for this device and backbone, newer than ``last_counter`` and not ahead of the clock (a
    stolen key cannot push the counter past every honest one), not expired and not expiring later
    than petah signs. Returns its signed content; any failure is a one-line PetahError naming what
    failed."""
    from securesystemslib.signer import Signature

    if not isinstance(assignment, dict) or not isinstance(assignment.get("signed"), str) or not isinstance(
            assignment.get("signatures"), list):
        raise PetahError("the hub's answer carries no director assignment (the trusted root names a director key)")
    text = assignment["signed"]
    if len(text) > MAX_BYTES:
        raise PetahError("the hub's assignment is larger than any petah writes")
    for entry in assignment["signatures"][:4]:
        if isinstance(entry, dict) and entry.get("keyid") == key.keyid and isinstance(entry.get("sig"), str):
            try:
                key.verify_signature(Signature(key.keyid, entry["sig"]), text.encode())
                break
            except Exception:  # securesystemslib raises its own types for a bad or malformed signature
                continue
    else:
        raise PetahError(f"the hub's assignment is not signed by the director key the trusted root names "
                         f"({key.keyid[:12]}…)")
    try:
        signed = json.loads(text)
        expires = dt.datetime.fromisoformat(signed["expires"].replace("Z", "+00:00"))
        counter = signed["counter"]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise PetahError("the hub's assignment is signed but malformed") from None
    if signed.get("type") != TYPE or not isinstance(counter, int) or not isinstance(signed.get("desired"), dict) \
            or not isinstance(signed.get("withdrawn"), dict) or expires.tzinfo is None:
        raise PetahError("the hub's assignment is signed but malformed")
    if signed.get("device") != device:
        raise PetahError(f"the hub's assignment is for device {str(signed.get('device'))[:64]!r}, not {device!r}")
    if signed.get("backbone") != backbone:
        raise PetahError("the hub's assignment is for another backbone than this station runs")
    now = dt.datetime.now(dt.UTC)
    if counter > (now + CLOCK_SKEW).timestamp() * 1000:  # the hub counts from its clock in ms: no further
        raise PetahError(f"the hub's assignment counter {counter} is ahead of this station's clock by more than "
                         f"{CLOCK_SKEW}: refused (it would make every later assignment look like a replay)")
    if expires > now + LIFETIME + CLOCK_SKEW:
        raise PetahError(f"the hub's assignment expires at {signed['expires']}, later than any petah signs")
    if counter <= last_counter:
        raise PetahError(f"the hub's assignment is a replay: counter {counter} is not above {last_counter}, the "
                         f"last this station accepted")
    if expires <= now:
        raise PetahError(f"the hub's assignment expired at {signed['expires']}")
    return signed


__all__ = ["FIELD", "LIFETIME", "Director", "director_entry", "director_key", "verify"]
