"""What the station's routes depend on: the station, and its bearer-token checks (tokens read once,
when the app is made, and kept on ``app.state``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from petah.http import ClientError
from petah.http_app import Authorization, bearer_matches, unauthorized
from petah.serve.station import Station


def get_station(request: Request) -> Station:
    return request.app.state.station


StationDep = Annotated[Station, Depends(get_station)]


def require_api_token(request: Request, authorization: Authorization = None) -> None:
    """Every endpoint but /healthz and the page's static files needs the API token (when one is set)."""
    token = request.app.state.api_token
    if token is not None and not bearer_matches(authorization, token):
        raise unauthorized("this station needs its bearer token (Authorization: Bearer …)")


def require_admin_token(request: Request, authorization: Authorization = None) -> None:
    """The admin token alone opens the admin endpoints (it is the stronger credential: one
    Authorization header cannot carry both tokens)."""
    token = request.app.state.admin_token
    if token is None:
        raise ClientError(401, "admin endpoints are disabled: start petah serve with --admin-token-file")
    if not bearer_matches(authorization, token):
        raise unauthorized("wrong or missing admin bearer token")


def require_admin(request: Request, station: StationDep, authorization: Authorization = None) -> None:
    """The admin token, for changes of the served set: refused while a hub decides that set."""
    config = station.config
    if request.app.state.admin_token is not None and config.hub and not config.allow_manual:
        raise ClientError(403, f"this station follows the releases of {config.hub}: changes by hand are refused "
                               "(start it with --allow-manual to allow them)")
    require_admin_token(request, authorization)


__all__ = ["StationDep", "get_station", "require_admin", "require_admin_token", "require_api_token"]
