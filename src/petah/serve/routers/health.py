"""/healthz: open (no token), so a supervisor or load balancer can ask without credentials."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from petah.serve.routers.deps import StationDep

router = APIRouter()


@router.get("/healthz", summary="Liveness: the station answers and its inference thread runs")
def healthz(station: StationDep):
    alive = station.worker.alive
    return JSONResponse({"status": "ok" if alive else "inference thread stopped", "tasks": len(station.tasks)},
                        200 if alive else 503)
