"""The update repository as static files, open to anyone (TUF metadata is signed, targets are named
by their hashes): what any HTTP server or CDN could serve in the hub's place."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from petah.errors import PetahError
from petah.files import inside
from petah.fleet.routers.deps import HubDep
from petah.http import ClientError

router = APIRouter()


def static(path: Path) -> Response:
    if not path.is_file():
        raise ClientError(404, "not found")
    return Response(path.read_bytes(), media_type="application/octet-stream")


@router.get("/metadata/{name}")
async def metadata(name: str, hub: HubDep):
    if name == "timestamp.json":
        await run_in_threadpool(hub.repository.refresh)  # re-signed before it gets stale
    try:
        return static(hub.repository.file(name))
    except PetahError:
        raise ClientError(404, "not found") from None


@router.get("/targets/{task}/{name}")
async def target(task: str, name: str, hub: HubDep):
    try:
        path = inside(hub.repository.targets_dir, task, name)
    except PetahError:
        raise ClientError(404, "not found") from None
    return static(path)
