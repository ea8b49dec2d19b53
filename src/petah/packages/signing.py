"""Who made a package: Ed25519 signatures over its content hash, checked against trusted keys.

The format (docs/format.md) reserves the header slot ``signature``, outside what is hashed: a JSON
list of ``{"keyid", "sig"}``, ``keyid`` the hex sha256 of the signer's raw public key, ``sig`` the
base64 signature of ``petah-package-signature-v1:<content hash>``. Signing rewrites only that slot,
so several people can sign one package and the content hash never changes. Ed25519 comes from
``cryptography``; keys are PEM files (``NAME.key`` PKCS#8, mode 0600; ``NAME.pub``
SubjectPublicKeyInfo), and a trust store is a folder of ``*.pub`` files.

What the checks give: a package whose manifest or tensors were edited after signing has another
content hash (or fails its hash), so its signature no longer verifies; a signature copied from
another package signs another hash; a key not in the trust store proves nothing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from petah.errors import PetahError, PetahWarning
from petah.packages.format import TaskPackage, content_matches, read_package, set_signature, signed_message
from petah.packages.manifest import CURRENT_VERSIONS

KEYID = re.compile(r"[0-9a-f]{64}")
MAX_SIGNATURES = 16  # a slot is untrusted input: bounded like everything else read from a package
MAX_SLOT_CHARS = MAX_SIGNATURES * 200


class SignatureError(PetahError):
    """A package refused for who signed it (HTTP 403 at the station)."""


def _ed25519():
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return ed25519


def keyid(public_key) -> str:
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def generate_keypair(name: str | Path) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (private, mode 0600, created so no other user can ever read it) and
    ``NAME.pub``; an existing file is never overwritten. Returns both paths and the key id."""
    from cryptography.hazmat.primitives import serialization

    private_path, public_path = Path(f"{name}.key"), Path(f"{name}.pub")
    for path in (private_path, public_path):
        if path.exists():
            raise PetahError(f"{path} exists; keygen never overwrites a key")
        if not path.parent.is_dir():
            raise PetahError(f"cannot write {path}: {path.parent} is not a folder")
    key = _ed25519().Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    written = []
    try:
        for path, data, mode in ((private_path, private, 0o600), (public_path, public, 0o644)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)  # never through a link, never over a file
            written.append(path)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
    except OSError as exc:
        for path in written:  # a pair or nothing
            path.unlink(missing_ok=True)
        raise PetahError(f"cannot write {path}: {exc.strerror or exc}") from None
    return private_path, public_path, keyid(key.public_key())


def _load_pem(path: str | Path, load, expected: type, what: str):
    """A PEM key file through ``load``, refused in one line unless it holds an ``expected`` key."""
    from cryptography.exceptions import UnsupportedAlgorithm

    try:
        key = load(Path(path).read_bytes())
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PetahError(f"{path} is not a readable {what}: {reason}") from None
    if not isinstance(key, expected):
        raise PetahError(f"{path} is not an Ed25519 key")
    return key


def load_private_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization

    return _load_pem(path, lambda data: serialization.load_pem_private_key(data, password=None),
                     _ed25519().Ed25519PrivateKey,
                     "petah signing key (an unencrypted Ed25519 PEM from `petah keygen`)")


def load_public_key(path: str | Path):
    from cryptography.hazmat.primitives import serialization

    return _load_pem(path, serialization.load_pem_public_key, _ed25519().Ed25519PublicKey, "public key")


def parse_signatures(slot: str, origin: str) -> list[dict[str, str]]:
    """The slot's signatures, validated (an empty slot: none)."""
    if not slot:
        return []
    if len(slot) > MAX_SLOT_CHARS:
        raise SignatureError(f"{origin}: the signature slot is over {MAX_SLOT_CHARS} characters")
    try:
        entries = json.loads(slot)
    except (ValueError, RecursionError):  # JSONDecodeError, and int() limits on huge numbers
        raise SignatureError(f"{origin}: the signature slot is not valid JSON") from None
    if not isinstance(entries, list) or not 0 < len(entries) <= MAX_SIGNATURES:
        raise SignatureError(f"{origin}: the signature slot must be a list of 1..{MAX_SIGNATURES} signatures")
    for entry in entries:
        if (not isinstance(entry, dict) or set(entry) != {"keyid", "sig"}
                or not isinstance(entry["keyid"], str) or not KEYID.fullmatch(entry["keyid"])
                or not isinstance(entry["sig"], str) or len(entry["sig"]) > 200):
            raise SignatureError(f"{origin}: a signature must be {{\"keyid\": <64 hex>, \"sig\": <base64>}}")
    return entries


def sign_package(path: str | Path, key_path: str | Path) -> str:
    """Add (or renew) the key's signature in the package's slot; returns the key id."""
    key = load_private_key(key_path)
    package = read_package(path)  # verified: nobody signs what fails its own hash
    origin = f"package {path}"
    if package.manifest.format_version not in CURRENT_VERSIONS:
        raise PetahError(f"{path} is a format-{package.manifest.format_version} package: "
                         "`petah upgrade` it before signing")
    kid = keyid(key.public_key())
    sig = base64.b64encode(key.sign(signed_message(package.manifest.content_sha256))).decode("ascii")
    entries = [e for e in parse_signatures(package.signature, origin) if e["keyid"] != kid]
    if len(entries) >= MAX_SIGNATURES:
        raise PetahError(f"{path} already holds {MAX_SIGNATURES} signatures")
    set_signature(path, json.dumps(entries + [{"keyid": kid, "sig": sig}], separators=(",", ":")))
    return kid


class TrustStore:
    """Trusted public keys by key id, from a folder of ``*.pub`` files."""

    def __init__(self, keys: dict[str, object], source: str):
        self.keys, self.source = keys, source

    @classmethod
    def from_dir(cls, folder: str | Path) -> TrustStore:
        folder = Path(folder)
        if not folder.is_dir():
            raise PetahError(f"--trust {folder}: not a folder of trusted public keys (*.pub)")
        keys = {}
        for path in sorted(folder.glob("*.pub")):
            key = load_public_key(path)
            keys[keyid(key)] = key
        if not keys:
            raise PetahError(f"--trust {folder}: no public keys (*.pub) in it")
        return cls(keys, str(folder))

    def signers(self, package: TaskPackage, origin: str) -> tuple[list[str], list[str]]:
        """(trusted key ids whose signature verifies, key ids of signatures that do not)."""
        from cryptography.exceptions import InvalidSignature

        message = signed_message(package.manifest.content_sha256 or "")
        good, bad = [], []
        for entry in parse_signatures(package.signature, origin):
            key = self.keys.get(entry["keyid"])
            if key is None:
                bad.append(entry["keyid"])
                continue
            try:
                key.verify(base64.b64decode(entry["sig"], validate=True), message)
                good.append(entry["keyid"])
            except (InvalidSignature, binascii.Error, ValueError):
                bad.append(entry["keyid"])
        return good, bad


@dataclass
class TrustPolicy:
    """What a loader accepts: with a trust store, signed packages must verify (unsigned ones load
    with a warning); ``require_signed`` refuses anything not signed by a trusted key."""
    store: TrustStore | None = None
    require_signed: bool = False

    def __post_init__(self):
        if self.require_signed and self.store is None:
            raise PetahError("--require-signed needs --trust DIR (the keys a package must be signed with)")

    @classmethod
    def from_options(cls, trust: str | Path | None, require_signed: bool) -> TrustPolicy | None:
        if trust is None and not require_signed:
            return None
        return cls(TrustStore.from_dir(trust) if trust is not None else None, require_signed)

    def check(self, package: TaskPackage, origin: str) -> list[str]:
        """Refuse (``SignatureError``, one line) or accept a read package; returns its trusted signers."""
        if self.store is None:
            return []
        unsigned = (f"{origin} is a format-1 package (no signature)" if package.manifest.format_version == 1
                    else f"{origin} is not signed" if not package.signature else None)
        if unsigned:
            if self.require_signed:
                raise SignatureError(f"{unsigned}; --require-signed accepts only packages signed by a key in "
                                     f"{self.store.source}")
            warnings.warn(f"{unsigned}: loaded without a signature check (--require-signed refuses it)",
                          PetahWarning, stacklevel=2)
            return []
        good, bad = self.store.signers(package, origin)
        if good:
            return good
        untrusted = [k for k in bad if k not in self.store.keys]
        if untrusted and len(untrusted) == len(bad):
            raise SignatureError(f"{origin} is signed only by key(s) not in {self.store.source} "
                                 f"({', '.join(k[:16] for k in untrusted)}…)")
        raise SignatureError(f"{origin}: its signature does not verify (edited after signing, or a signature "
                             "copied from another package)")


def read_trusted(package: TaskPackage | str | Path, trust: TrustPolicy | None = None) -> tuple[TaskPackage, str]:
    """Read and verify a package (unless already read) and check who signed it (``trust``; None:
    any package that verifies); returns it and the name errors use for it. Loading, export and
    inspect read through it, so ``--trust`` / ``--require-signed`` mean the same for each."""
    if isinstance(package, TaskPackage):
        origin = f"package {package.task_name}"
        if trust is not None and not content_matches(package):  # in memory: read_package never checked it
            raise SignatureError(f"{origin}: its manifest and tensors do not match its content hash")
    else:
        origin = f"package {package}"
        package = read_package(package)
    if trust is not None:
        trust.check(package, origin)
    return package, origin


__all__ = ["SignatureError", "TrustPolicy", "TrustStore", "generate_keypair", "keyid", "load_private_key",
           "load_public_key", "parse_signatures", "read_trusted", "sign_package"]
