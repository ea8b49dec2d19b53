"""/metrics: the station's counters in Prometheus text format."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import Response

from petah.serve.routers.deps import StationDep, require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.get("/metrics", summary="Prometheus text format")
def metrics(station: StationDep):
    return Response(station.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")
