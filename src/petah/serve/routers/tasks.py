"""GET /v1/tasks: the tasks served (changing them is ``admin``'s)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from petah.serve.routers.deps import StationDep, require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.get("/v1/tasks", summary="The tasks served, with versions")
def tasks(station: StationDep):
    return {"tasks": station.task_list()}
