"""Changing the served set (admin token): install or replace a task, roll it back, delete it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.concurrency import run_in_threadpool

from petah.http import ClientError, read_body
from petah.serve.routers.deps import StationDep, require_admin

router = APIRouter(dependencies=[Depends(require_admin)])


@router.put("/v1/tasks/{name}", summary="Install or replace a task from a .petah body (admin)")
async def put_task(name: str, request: Request, station: StationDep):
    data = await read_body(request, station.config.max_upload_bytes)
    if not data:
        raise ClientError(400, "empty body: send the .petah file as the request body")
    record = await run_in_threadpool(station.install, data, name)
    return {"task": record.to_dict()}


@router.post("/v1/tasks/{name}/rollback", summary="Serve the task's previous version again (admin)")
async def rollback(name: str, station: StationDep):
    record = await run_in_threadpool(station.rollback, name)
    return {"task": record.to_dict()}


@router.delete("/v1/tasks/{name}", summary="Stop serving a task (admin)")
async def delete(name: str, station: StationDep):
    await run_in_threadpool(station.delete, name)
    return {"deleted": name}
