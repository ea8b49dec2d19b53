"""Talking to a hub: publish and withdraw releases (``petah release``), read its status. Standard
library HTTP only, with a timeout on every call."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from petah.errors import PetahError
from petah.fleet.metadata import release_targets, target_path
from petah.packages import read_package


def check_hub_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise PetahError(f"--hub {url!r}: give the hub's http(s)://HOST:PORT")
    return url.rstrip("/")


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None,
         timeout: float = 30.0) -> bytes:
    """One request; an HTTP error answer becomes a one-line PetahError with the hub's message."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except Exception:  # not the hub's JSON: the status line says enough
            message = exc.reason
        raise PetahError(f"{method} {urlsplit(url).path}: HTTP {exc.code}: {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PetahError(f"cannot reach {url}: {reason}") from None


def _multipart(fields: dict[str, bytes]) -> tuple[bytes, str]:
    import uuid

    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
             f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
             for name, data in fields.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def sign_release(package: str | Path, current_targets: bytes, key: str | Path,
                 min_score: float | None = None) -> tuple[bytes, bytes]:
    """The package's bytes and the next targets metadata naming it (task, backbone fingerprint,
    minimum golden score), signed by the release key."""
    path = Path(package)
    manifest = read_package(path).manifest  # verified before anything is signed
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    # TUF's canonical JSON has no floats: the score travels as a decimal string
    custom = {"task": manifest.task.name, "backbone": manifest.backbone.fingerprint,
              "min_score": None if min_score is None else f"{float(min_score):.6g}"}
    return data, release_targets(current_targets, key, add={target_path(manifest.task.name, sha): (data, custom)})


def pin_file(key: str | Path) -> Path:
    """Where the publisher keeps, per hub, the last targets version its release key signed."""
    key = Path(key)
    return key.with_name(f"{key.stem}.targets-pins.json")


def check_pin(key: str | Path, hub: str, current: bytes) -> None:
    """Refuse to sign on top of a targets version older than (or another than) the last one this
    key signed for this hub: a hub that rolls its metadata back (to re-add a withdrawn release,
    say) is caught here, though the older version carries this key's valid signature."""
    from petah.fleet.metadata import parse_metadata

    try:
        pins = json.loads(pin_file(key).read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        raise PetahError(f"{pin_file(key)} cannot be read ({exc}); it pins the targets versions this key signed") \
            from None
    pinned = pins.get(hub) if isinstance(pins, dict) else None
    if not isinstance(pinned, dict):
        return
    version = parse_metadata(current, "targets", "the hub's targets metadata").signed.version
    if version < pinned.get("version", 0) or (version == pinned.get("version")
                                              and hashlib.sha256(current).hexdigest() != pinned.get("sha256")):
        raise PetahError(f"the hub offers targets version {version}, but {key} last signed version "
                         f"{pinned.get('version')} for it: refusing to build on an older one (was the hub rolled "
                         f"back or tampered with?)")


def save_pin(key: str | Path, hub: str, signed: bytes) -> None:
    from petah.files import atomic_write_bytes
    from petah.fleet.metadata import parse_metadata

    path = pin_file(key)
    try:
        pins = json.loads(path.read_text())
    except (OSError, ValueError):
        pins = {}
    pins = pins if isinstance(pins, dict) else {}
    pins[hub] = {"version": parse_metadata(signed, "targets", "the signed targets").signed.version,
                 "sha256": hashlib.sha256(signed).hexdigest()}
    atomic_write_bytes(path, json.dumps(pins, indent=1).encode())


def publish_release(package: str | Path, hub: str, key: str | Path, *, stages: list[int] = (10, 50, 100),
                    min_healthy: float = 0.9, max_failed: float = 0.2, min_score: float | None = None) -> dict:
    """Sign the hub's next targets metadata with the release key, naming this package (task,
    backbone fingerprint, minimum golden score), and upload both with the rollout settings."""
    from petah.fleet.registry import check_rollout

    hub = check_hub_url(hub)
    check_rollout(list(stages), min_healthy, max_failed)
    current = call(f"{hub}/v1/targets-metadata")
    check_pin(key, hub, current)
    data, targets = sign_release(package, current, key, min_score)
    settings = {"stages": list(stages), "min_healthy": min_healthy, "max_failed": max_failed, "min_score": min_score}
    body, content_type = _multipart({"package": data, "targets": targets, "settings": json.dumps(settings).encode()})
    result = json.loads(call(f"{hub}/v1/releases", "POST", body, {"Content-Type": content_type}))
    save_pin(key, hub, targets)
    return result


def sign_backbone_release(folder: str | Path, packages: list[str | Path], replaces: str, current_targets: bytes,
                          key: str | Path, min_score: float | None = None) -> tuple[bytes, list[bytes], bytes]:
    """A backbone release: the device backbone folder packed, the task packages adapted on it, and
    the next targets metadata naming all of them (the backbone's entry: the fingerprint it
    replaces and every task's sha256), signed by the release key. Everything is verified first."""
    from petah.device.bundle import pack_device_backbone, read_device_backbone
    from petah.fleet.ids import BACKBONE
    from petah.fleet.metadata import backbone_target_path

    backbone = read_device_backbone(folder)
    if replaces == backbone.fingerprint:
        raise PetahError("--replaces names the released backbone itself")
    score = None if min_score is None else f"{float(min_score):.6g}"
    add, tasks = {}, {}
    for package in packages:
        manifest = read_package(package).manifest
        if manifest.backbone.fingerprint != backbone.fingerprint:
            raise PetahError(f"{package}: adapted on backbone {manifest.backbone.fingerprint[:16]}…, not on "
                             f"{backbone.describe()}")
        if manifest.task.name in tasks:
            raise PetahError(f"{package}: a second package of task {manifest.task.name}")
        data = Path(package).read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        tasks[manifest.task.name] = sha
        add[target_path(manifest.task.name, sha)] = (data, {"task": manifest.task.name,
                                                            "backbone": backbone.fingerprint, "min_score": score})
    if not tasks:
        raise PetahError("a backbone release carries every task adapted on it: give at least one package")
    datas = [data for data, _ in add.values()]  # the packages (a task may be named "backbones")
    packed = pack_device_backbone(backbone)
    add[backbone_target_path(hashlib.sha256(packed).hexdigest(), replaces, tasks)] = (packed, {
        "kind": "backbone", "task": BACKBONE, "backbone": replaces, "fingerprint": backbone.fingerprint,
        "tasks": tasks, "min_score": score})
    return packed, datas, release_targets(current_targets, key, add=add)


def replaced_fingerprint(spec: str) -> str:
    """``--replaces``: a backbone fingerprint (64 hex digits) or a device backbone folder."""
    import re

    if re.fullmatch(r"[0-9a-f]{64}", spec):
        return spec
    from petah.device.bundle import read_device_backbone

    return read_device_backbone(spec).fingerprint


def publish_backbone(folder: str | Path, packages: list[str | Path], replaces: str, hub: str, key: str | Path, *,
                     stages: list[int] = (10, 50, 100), min_healthy: float = 0.9, max_failed: float = 0.2,
                     min_score: float | None = None) -> dict:
    """Publish a new backbone and every task re-adapted on it as one release (staged like a task
    release): stations of backbone ``replaces`` move to it, gated and watched, and move back
    together when it is halted or withdrawn."""
    from petah.fleet.registry import check_rollout

    hub = check_hub_url(hub)
    check_rollout(list(stages), min_healthy, max_failed)
    replaces = replaced_fingerprint(replaces)
    current = call(f"{hub}/v1/targets-metadata")
    check_pin(key, hub, current)
    packed, datas, targets = sign_backbone_release(folder, packages, replaces, current, key, min_score)
    settings = {"stages": list(stages), "min_healthy": min_healthy, "max_failed": max_failed, "min_score": min_score}
    fields = {"backbone": packed, "targets": targets, "settings": json.dumps(settings).encode()}
    fields |= {f"package-{i}": data for i, data in enumerate(datas)}
    body, content_type = _multipart(fields)
    result = json.loads(call(f"{hub}/v1/backbone-releases", "POST", body, {"Content-Type": content_type},
                             timeout=120))
    save_pin(key, hub, targets)
    return result


def withdraw_release(release_id: int, hub: str, key: str | Path, token: str | None = None) -> dict:
    """Take a release out of the signed targets (release key) and mark it withdrawn: stations that
    run it return to their previous version (``token``: the hub's read token, where it has one)."""
    hub = check_hub_url(hub)
    status = hub_status(hub, token)
    found = [r for r in status["releases"] if r["id"] == release_id]
    if not found:
        raise PetahError(f"the hub has no release {release_id}")
    # release_targets refuses a target the signed metadata does not hold: only signed releases go
    current = call(f"{hub}/v1/targets-metadata")
    check_pin(key, hub, current)
    members = tuple(m["target"] for m in (found[0].get("members") or {}).values())  # a backbone release's tasks
    targets = release_targets(current, key, remove=(found[0]["target"], *members))
    result = json.loads(call(f"{hub}/v1/releases/{release_id}/withdraw", "POST", targets,
                             {"Content-Type": "application/json"}))
    save_pin(key, hub, targets)
    return {**result, "target": found[0]["target"]}


def bearer(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def hub_status(hub: str, token: str | None = None) -> dict:
    """Every release with its stage, counts and failures, the stations, the drifting tasks
    (``token``: the hub's read or admin token, where it has one)."""
    return json.loads(call(f"{check_hub_url(hub)}/v1/releases", headers=bearer(token)))


def operate_release(release_id: int, action: str, hub: str, token: str) -> dict:
    """An operator's pause / resume / halt of a release (the hub's admin token)."""
    return json.loads(call(f"{check_hub_url(hub)}/v1/releases/{int(release_id)}/{action}", "POST", b"",
                           bearer(token)))


__all__ = ["call", "check_hub_url", "hub_status", "operate_release", "publish_backbone", "publish_release",
           "sign_backbone_release", "sign_release", "withdraw_release"]
