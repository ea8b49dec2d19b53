"""POST /v1/predict: every requested task's result for one or more images, batched with other
requests' images on the inference thread."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from petah.http import ClientError, parse_form, read_body
from petah.serve.routers.deps import StationDep, require_api_token
from petah.serve.worker import Upload

router = APIRouter(dependencies=[Depends(require_api_token)])


async def read_images(request: Request, limit: int, max_images: int) -> tuple[list[Upload], list[str] | None]:
    """The uploaded images (multipart field ``image``, repeatable; or one raw ``image/*`` body) and
    the ``tasks`` asked for (form field or query, comma-separated; absent: every task)."""
    content_type = request.headers.get("content-type", "")
    body = await read_body(request, limit)
    tasks_field = request.query_params.get("tasks")
    if content_type.startswith("image/"):
        uploads = [Upload("body", body)]
    elif content_type.startswith("multipart/form-data"):
        form = await parse_form(request, body, max_images)
        files = form.getlist("image")
        if any(not isinstance(f, UploadFile) for f in files):
            raise ClientError(400, "the field 'image' must carry files, not text")
        uploads = [Upload(f.filename or f"image{i}", await f.read()) for i, f in enumerate(files)]
        text = form.get("tasks")
        if isinstance(text, str) and text.strip():
            tasks_field = text
    else:
        raise ClientError(415, "send images as multipart/form-data (field 'image', repeatable) or one raw "
                               "image/* body")
    if not uploads:
        raise ClientError(400, "no image: add one or more files in the multipart field 'image'")
    if len(uploads) > max_images:
        raise ClientError(400, f"{len(uploads)} images in one request; at most {max_images}")
    tasks = [t.strip() for t in tasks_field.split(",") if t.strip()] if tasks_field else None
    return uploads, tasks


@router.post("/v1/predict", summary="Every requested task's result for one or more images")
async def predict(request: Request, station: StationDep):
    config = station.config
    started = time.perf_counter()
    station.in_flight += 1  # only the event loop thread changes it
    try:
        uploads, names = await read_images(request, config.max_upload_bytes, config.max_images)
        tasks = station.check_tasks(names)
        job = await run_in_threadpool(station.decode, uploads, tasks)
        prediction = await asyncio.wrap_future(station.submit(job))
        images = await run_in_threadpool(station.render, prediction, uploads)
        if station.capture is not None:
            await run_in_threadpool(station.keep_captures, uploads, images)
    finally:
        station.in_flight -= 1
    seconds = time.perf_counter() - started
    station.metrics.observe_prediction(tasks, seconds)
    # a JSONResponse skips FastAPI's jsonable_encoder walk over every result (plain JSON types already)
    return JSONResponse({"images": images, "latency_ms": round(1000 * seconds, 3),
                         "batch_images": prediction.batch_images})
