"""/v1/stats: the counters the page shows."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from petah.serve.routers.deps import StationDep, require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.get("/v1/stats", summary="Counters the page shows")
def stats(station: StationDep):
    memory = station.engine.memory() if hasattr(station.engine, "memory") else None
    return {**station.metrics.summary(), "engine": station.engine.name, "backbone": station.backbone.describe(),
            "queue_depth": station.worker.depth, "memory": memory}
