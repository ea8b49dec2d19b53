"""/v1/sources and /v1/sinks: the line's camera streams, watched folders and result sinks
(``--source``, ``--sink``), each with its state, last error and counters."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from petah.errors import PetahError
from petah.http import ClientError, parse_json, read_body
from petah.serve.line import TRIGGER_FRAME_S
from petah.serve.routers.deps import StationDep, require_admin_token, require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])


def _status(station) -> dict:
    line = getattr(station, "line", None)
    return line.status() if line is not None else {"sources": [], "sinks": []}


@router.get("/v1/sources", summary="Each source: its state, last error, frames decoded / answered / dropped, latency")
def sources(station: StationDep):
    return {"sources": _status(station)["sources"]}


@router.get("/v1/sinks", summary="Each sink: its state, last error, records queued / delivered / dropped, backlog")
def sinks(station: StationDep):
    return {"sinks": _status(station)["sinks"]}


@router.get("/v1/sources/{name}/latest", summary="A source's newest answered frame (JPEG, base64) with its answers")
def latest(name: str, station: StationDep):
    line = getattr(station, "line", None)
    if line is None or name not in line.runs:
        raise ClientError(404, f"no source {name[:64]!r}")
    found = line.latest(name)
    if found is None:
        raise ClientError(404, f"source {name} has answered no frame yet")
    return found


@router.post("/v1/sources/{name}/trigger",
             summary='Answer a triggered source on its next frame: {"id": "part-17"} (optional); the results')
async def trigger(name: str, request: Request, station: StationDep):
    body = await read_body(request, 1 << 12)
    data = parse_json(body, "the trigger body") if body.strip() else {}
    if not isinstance(data, dict) or not isinstance(data.get("id"), str | int | None):
        raise ClientError(400, 'a trigger is {"id": "…"} (or no body)')
    try:
        pending = station.line.trigger(name, None if data.get("id") is None else str(data["id"])[:128])
    except KeyError:
        raise ClientError(404, f"no source {name[:64]!r}") from None
    except PetahError as exc:
        raise ClientError(409, str(exc)) from None
    try:  # awaited, not a pool thread parked per trigger: waiting triggers never starve decoding
        records = await asyncio.wait_for(asyncio.wrap_future(pending.future), TRIGGER_FRAME_S + 120)
    except PetahError as exc:
        raise ClientError(503, str(exc)) from None
    except TimeoutError:
        raise ClientError(504, f"source {name}: the trigger was not answered in time (the station is busy)") from None
    return {"source": name, "trigger": pending.id, "results": records}


@router.put("/v1/sources/{name}", dependencies=[Depends(require_admin_token)],
            summary="Add or replace a source, kept across restarts (admin): {uri, tasks, fps, loop, after}")
async def put_source(name: str, request: Request, station: StationDep):
    data = parse_json(await read_body(request, 1 << 16), "the source body")
    return {"source": await run_in_threadpool(station.line.put_source, name, data)}


@router.delete("/v1/sources/{name}", dependencies=[Depends(require_admin_token)], summary="Stop a source (admin)")
async def delete_source(name: str, station: StationDep):
    try:
        await run_in_threadpool(station.line.delete_source, name)
    except KeyError:
        raise ClientError(404, f"no source {name[:64]!r}") from None
    return {"deleted": name}
