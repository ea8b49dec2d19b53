"""Releases: publish (a package with its targets metadata signed by the release key: the hub needs
no credential of its own to check it), withdraw, the rollout status (``--read-token-file``: behind a
token), and the operators' pause / resume / halt (the admin token)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from petah.errors import PetahError
from petah.fleet.registry import OPERATIONS
from petah.fleet.routers.deps import HubDep, check_id, require_hub_admin, require_reader
from petah.http import ClientError, form_files, parse_json, read_body

MAX_RELEASE_BYTES = 64 * 1024 * 1024
MAX_BACKBONE_RELEASE_BYTES = 512 * 1024 * 1024  # a device backbone (weights in float32) and its tasks
MAX_BACKBONE_TASKS = 64

router = APIRouter()


@router.post("/v1/releases")
async def publish(request: Request, hub: HubDep):
    body = await read_body(request, MAX_RELEASE_BYTES)
    parts = await form_files(request, body, ("package", "targets", "settings"))
    settings = parse_json(parts["settings"] or b"{}", "settings")
    if not isinstance(settings, dict):
        raise ClientError(400, "settings must be a JSON object")
    return await run_in_threadpool(hub.publish, parts["package"], parts["targets"], settings)


@router.post("/v1/backbone-releases", summary="A new backbone and every task adapted on it, staged as one release")
async def publish_backbone(request: Request, hub: HubDep):
    from starlette.datastructures import UploadFile

    from petah.http import parse_form

    body = await read_body(request, MAX_BACKBONE_RELEASE_BYTES)
    form = await parse_form(request, body, MAX_BACKBONE_TASKS + 3)
    parts = {}
    for name, item in form.multi_items():
        parts[name] = await item.read() if isinstance(item, UploadFile) else item.encode()
    missing = [name for name in ("backbone", "targets", "settings") if name not in parts]
    if missing:
        raise ClientError(400, f"the multipart body has no field {missing[0]!r}")
    settings = parse_json(parts["settings"] or b"{}", "settings")
    if not isinstance(settings, dict):
        raise ClientError(400, "settings must be a JSON object")
    packages = [data for name, data in parts.items() if name.startswith("package-")]
    return await run_in_threadpool(hub.publish_backbone, parts["backbone"], packages, parts["targets"], settings)


@router.post("/v1/releases/{release_id}/withdraw")
async def withdraw(release_id: int, request: Request, hub: HubDep):
    check_id(release_id, "the release id")
    body = await read_body(request, MAX_RELEASE_BYTES)
    return await run_in_threadpool(hub.withdraw, release_id, body)


@router.get("/v1/releases", dependencies=[Depends(require_reader)])
def releases(hub: HubDep):
    return hub.registry.status()


@router.post("/v1/releases/{release_id}/{action}", dependencies=[Depends(require_hub_admin)],
             summary="An operator's pause (no stage advances), resume, or halt (stations return): the admin token")
async def operate(release_id: int, action: str, hub: HubDep):
    check_id(release_id, "the release id")
    if action not in OPERATIONS:
        raise ClientError(404, f"no action {action[:32]!r} (one of {', '.join(OPERATIONS)}, withdraw)")
    try:
        state = await run_in_threadpool(hub.registry.operate, release_id, action)
    except KeyError:
        raise ClientError(404, f"no release {release_id}") from None
    except PetahError as exc:
        raise ClientError(409, str(exc)) from None
    return {"release": release_id, "state": state}


@router.get("/v1/targets-metadata")
def current_targets(hub: HubDep):
    return Response(hub.repository.current_targets(), media_type="application/json")
