"""/healthz: the hub answers; /v1/stats: what this hub process did (polls answered, its database
transactions, their time and the time spent waiting for the database's lock)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from petah.fleet.routers.deps import HubDep, require_reader

router = APIRouter()


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/v1/stats", dependencies=[Depends(require_reader)])
def stats(hub: HubDep):
    db = hub.registry.db
    return {"polls": hub.polls, "database": db.dialect, **{k: round(v, 6) for k, v in db.stats.items()}}
