"""The hub: serves TUF metadata and release packages (static files), takes signed releases,
decides rollout stages and collects device reports (``petah hub serve``).

Layout of ``--root DIR``::

    metadata/N.root.json, N.targets.json, N.snapshot.json, timestamp.json   (TUF, python-tuf)
    targets/TASK/SHA256.SHA256.petah                                         (release packages)
    keys/online.key                  the online snapshot + timestamp key (created by ``hub init``)
    hub.db                           releases, devices, reports (SQLite, ``petah.fleet.registry``)
    incoming/petah-<16 hex>.tmp      temp files of writes in progress; leftovers of a killed hub
                                     are removed at the next start (``Repository.sweep_incoming``)

Publishing needs no hub credential: an upload is accepted only with targets metadata signed by
the release key the trusted root names (the hub could not forge one). Devices authenticate with
their own bearer token (``petah hub add-device``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from petah.errors import PetahError
from petah.files import inside
from petah.fleet.metadata import Repository, parse_metadata, target_path, verify_role
from petah.fleet.registry import ACTIVE, Registry, check_rollout
from petah.http import ClientError, form_files, listen, parse_json, read_body
from petah.http_server import guarded_server

DEVICE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_RELEASE_BYTES = 64 * 1024 * 1024
MAX_REPORT_BYTES = 64 * 1024
HUB_MAX_REQUESTS = 1024  # requests in progress at once (each body is bounded); past it 503 with Retry-After


def finite_number(settings: dict, key: str, default):
    """A rollout setting from an untrusted JSON object: a finite number (or the default)."""
    import math

    value = settings.get(key, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise PetahError(f"{key} must be a finite number, got {value!r}")
    return float(value)


def check_id(value, label: str) -> int:
    """A whole number that fits SQLite's integers (a request may carry any size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ClientError(400, f"{label} must be a whole number in [0, 2^63)")
    return value


def check_device_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not DEVICE_ID.fullmatch(device_id):
        raise PetahError(f"device id {device_id!r}: use 1-64 characters of A-Z a-z 0-9 . _ -")
    return device_id


def add_device(root: str | Path, device_id: str, token_file: str | Path) -> Path:
    """Register a device: a new random token written to ``token_file`` (mode 0600, never over a
    file), its hash kept by the hub."""
    import os

    check_device_id(device_id)
    Repository(root)  # a hub root, or a clear error
    token_file = Path(token_file)
    if token_file.exists():
        raise PetahError(f"{token_file} exists; add-device never overwrites a token file")
    token = secrets.token_urlsafe(32)
    registry = Registry(Path(root) / "hub.db")
    try:
        registry.add_device(device_id, token)
    finally:
        registry.close()
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(token + "\n")
    return token_file


@dataclass
class Faults:
    """Faults the hub injects into its own answers (``petah bench fleet``; off by default):
    each probability applies per request to metadata / target downloads."""
    drop: float = 0.0  # close the connection mid-answer
    truncate: float = 0.0  # send half of a target
    corrupt: float = 0.0  # flip a byte of a target
    delay: float = 0.0  # answer after ``delay_s``
    delay_s: float = 2.0
    down: bool = False  # every request fails (the hub is "down")
    seed: int = 0
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, kind: str) -> bool:
        p = getattr(self, kind)
        with self._lock:
            hit = p > 0 and self._rng.random() < p
            if hit:
                self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit


class Hub:
    """What the endpoints call: the metadata repository and the registry, usable without HTTP."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.repository = Repository(self.root)
        self.repository.sweep_incoming()  # what a killed publish left (files petah names and no one holds)
        self.registry = Registry(self.root / "hub.db")
        self._publish = threading.Lock()

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
        if any(r.sha256 == sha and r.state in ACTIVE for r in self.registry.releases()):
            raise PetahError(f"version {sha[:12]} is already released and active")
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
        with self._publish:
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
        with self._publish:
            self.repository.accept_targets(targets_metadata, {})
            self.registry.set_state(release_id, "withdrawn")
        return {"release": release_id, "state": "withdrawn"}


def create_hub_app(hub: Hub, faults: Faults | None = None):
    faults = faults or Faults()
    # FastAPI's /docs and /redoc load their UI from a public CDN: off (the schema stays at /openapi.json)
    app = FastAPI(title="petah hub", version="1", docs_url=None, redoc_url=None)

    @app.exception_handler(ClientError)
    async def client_error(_request, exc: ClientError):
        return JSONResponse({"error": exc.message}, exc.status, headers=exc.headers)

    @app.exception_handler(PetahError)
    async def petah_error(_request, exc: PetahError):
        return JSONResponse({"error": str(exc)}, 400)

    @app.exception_handler(Exception)
    async def internal_error(_request, _exc: Exception):
        return JSONResponse({"error": "internal error (the hub's log has the details)"}, 500)

    @app.middleware("http")
    async def inject(request: Request, call_next):
        if faults.down:
            faults.counts["down"] = faults.counts.get("down", 0) + 1
            return JSONResponse({"error": "hub down (fault injection)"}, 503)
        if faults.draw("delay"):
            await asyncio.sleep(faults.delay_s)
        return await call_next(request)

    def device(device_id: str, authorization: str | None) -> str:
        check_device_id(device_id)
        token = (authorization or "").removeprefix("Bearer ").strip()
        if not hub.registry.token_matches(device_id, token):
            raise ClientError(401, f"device {device_id}: wrong or missing device token", {"WWW-Authenticate": "Bearer"})
        return device_id

    def static(path: Path) -> Response:
        if not path.is_file():
            raise ClientError(404, "not found")
        data = path.read_bytes()
        if faults.draw("drop"):
            async def broken():
                yield data[: len(data) // 3]
                raise ConnectionAbortedError("fault injection: connection dropped")
            from starlette.responses import StreamingResponse
            return StreamingResponse(broken(), headers={"Content-Length": str(len(data))})
        return Response(data, media_type="application/octet-stream")

    @app.get("/metadata/{name}")
    async def metadata(name: str):
        if name == "timestamp.json":
            await run_in_threadpool(hub.repository.refresh)  # re-signed before it gets stale
        try:
            return static(hub.repository.file(name))
        except PetahError:
            raise ClientError(404, "not found") from None

    @app.get("/targets/{task}/{name}")
    async def target(task: str, name: str):
        try:
            path = inside(hub.repository.targets_dir, task, name)
        except PetahError:
            raise ClientError(404, "not found") from None
        if path.is_file() and (faults.truncate or faults.corrupt):
            data = path.read_bytes()
            if faults.draw("truncate"):
                return Response(data[: len(data) // 2], media_type="application/octet-stream")
            if faults.draw("corrupt"):
                flipped = bytearray(data)
                flipped[len(data) // 2] ^= 0xFF
                return Response(bytes(flipped), media_type="application/octet-stream")
        return static(path)

    @app.post("/v1/releases")
    async def publish(request: Request):
        body = await read_body(request, MAX_RELEASE_BYTES)
        parts = await form_files(request, body, ("package", "targets", "settings"))
        settings = parse_json(parts["settings"] or b"{}", "settings")
        if not isinstance(settings, dict):
            raise ClientError(400, "settings must be a JSON object")
        return await run_in_threadpool(hub.publish, parts["package"], parts["targets"], settings)

    @app.post("/v1/releases/{release_id}/withdraw")
    async def withdraw(release_id: int, request: Request):
        check_id(release_id, "the release id")
        body = await read_body(request, MAX_RELEASE_BYTES)
        return await run_in_threadpool(hub.withdraw, release_id, body)

    @app.get("/v1/releases")
    def releases():
        return hub.registry.status()

    @app.get("/v1/targets-metadata")
    def current_targets():
        return Response(hub.repository.current_targets(), media_type="application/json")

    async def json_body(request: Request, what: str) -> dict:
        data = parse_json(await read_body(request, MAX_REPORT_BYTES), what)
        if not isinstance(data, dict):
            raise ClientError(400, f"{what} must be a JSON object")
        return data

    @app.post("/v1/devices/{device_id}/poll")
    async def poll(device_id: str, request: Request, authorization: Annotated[str | None, Header()] = None):
        device(device_id, authorization)
        data = await json_body(request, "the poll body")
        installed = data.get("installed", {})
        if not isinstance(installed, dict) or not all(isinstance(v, str) for v in installed.values()):
            raise ClientError(400, "installed must map task names to sha256 strings")
        return await run_in_threadpool(hub.registry.poll, device_id, str(data.get("backbone", ""))[:64],
                                       installed, str(data.get("state", ""))[:200])

    @app.post("/v1/devices/{device_id}/report")
    async def report(device_id: str, request: Request, authorization: Annotated[str | None, Header()] = None):
        device(device_id, authorization)
        data = await json_body(request, "the report body")
        release = data.get("release")
        if release is not None:
            check_id(release, "release")
        numbers = [check_id(data.get("bytes", 0), "bytes"), check_id(data.get("retries", 0), "retries")]
        await run_in_threadpool(hub.registry.report, device_id, str(data.get("event")), release,
                                data.get("task") if isinstance(data.get("task"), str) else None,
                                str(data.get("detail", "")), *numbers)
        return {"ok": True}

    @app.get("/healthz")
    def healthz():
        return {"status": "ok"}

    return app


@contextlib.contextmanager
def running_hub(hub: Hub, faults: Faults | None = None, host: str = "127.0.0.1", port: int = 0,
                log_level: str = "warning", **guards):
    """The hub served by uvicorn on a thread of this process (tests, ``petah bench fleet``); yields
    its URL and the server (``server.should_exit``); ``guards`` go to ``guarded_server``."""
    import time

    sock = listen(host, port)
    server = guarded_server(create_hub_app(hub, faults), max_requests=HUB_MAX_REQUESTS, log_level=log_level,
                            lifespan="off", **guards)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise PetahError("the hub did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


__all__ = ["Faults", "Hub", "add_device", "check_device_id", "create_hub_app", "running_hub"]
