"""/v1/captures: the images the station kept for re-adaptation (``--capture-dir``), and an
operator's review of each answer (the page's "Captured" list uses these)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from petah.errors import PetahError
from petah.http import ClientError, parse_json, read_body
from petah.serve.routers.deps import StationDep, require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])
MEDIA = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff", ".webp": "image/webp"}


def _store(station):
    if station.capture is None:
        raise ClientError(404, "this station keeps no captures (start it with --capture-dir DIR)")
    return station.capture


@router.get("/v1/captures", summary="The captured images, newest first, with the answers and their review")
def captures(station: StationDep, limit: int = 50, offset: int = 0):
    if not 1 <= limit <= 500 or offset < 0:
        raise ClientError(400, "limit must be 1..500 and offset at least 0")
    return _store(station).listing(limit, offset)


@router.get("/v1/captures/{capture_id}/image", summary="A captured image as it arrived")
def capture_image(capture_id: str, station: StationDep):
    try:
        path = _store(station).image_path(capture_id)
    except KeyError:
        raise ClientError(404, f"no capture {capture_id[:40]!r}") from None
    if not path.is_file():
        raise ClientError(404, f"capture {capture_id} has lost its image")
    return FileResponse(path, media_type=MEDIA.get(path.suffix, "application/octet-stream"))


@router.post("/v1/captures/{capture_id}/review", summary="An operator's label (or keep / discard) for one answer")
async def review(capture_id: str, request: Request, station: StationDep):
    store = _store(station)
    data = parse_json(await read_body(request, 4096), "the review")
    if not isinstance(data, dict) or not isinstance(data.get("task"), str):
        raise ClientError(400, 'send {"task": NAME, "label": CLASS} or {"task": NAME, "keep": true|false}')
    try:
        return await run_in_threadpool(store.review, capture_id, data["task"], data.get("label"), data.get("keep"))
    except KeyError:
        raise ClientError(404, f"no capture {capture_id[:40]!r}") from None
    except PetahError as exc:
        raise ClientError(400, str(exc)) from None
