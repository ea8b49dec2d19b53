"""Releases: publish (a package with its targets metadata signed by the release key: the hub needs
no credential of its own to check it), withdraw, and the rollout status."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from petah.fleet.routers.deps import HubDep, check_id
from petah.http import ClientError, form_files, parse_json, read_body

MAX_RELEASE_BYTES = 64 * 1024 * 1024

router = APIRouter()


@router.post("/v1/releases")
async def publish(request: Request, hub: HubDep):
    body = await read_body(request, MAX_RELEASE_BYTES)
    parts = await form_files(request, body, ("package", "targets", "settings"))
    settings = parse_json(parts["settings"] or b"{}", "settings")
    if not isinstance(settings, dict):
        raise ClientError(400, "settings must be a JSON object")
    return await run_in_threadpool(hub.publish, parts["package"], parts["targets"], settings)


@router.post("/v1/releases/{release_id}/withdraw")
async def withdraw(release_id: int, request: Request, hub: HubDep):
    check_id(release_id, "the release id")
    body = await read_body(request, MAX_RELEASE_BYTES)
    return await run_in_threadpool(hub.withdraw, release_id, body)


@router.get("/v1/releases")
def releases(hub: HubDep):
    return hub.registry.status()


@router.get("/v1/targets-metadata")
def current_targets(hub: HubDep):
    return Response(hub.repository.current_targets(), media_type="application/json")
