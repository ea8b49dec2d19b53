"""What the hub's routes depend on: the hub, the device a request speaks for (its id and bearer
token), and whole numbers that fit SQLite."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from petah.fleet.hub import Hub
from petah.fleet.ids import check_device_id
from petah.http import ClientError
from petah.http_app import Authorization, bearer_matches, bearer_token, unauthorized


def get_hub(request: Request) -> Hub:
    return request.app.state.hub


HubDep = Annotated[Hub, Depends(get_hub)]


def authenticated_device(device_id: str, hub: HubDep, authorization: Authorization = None) -> str:
    """The path's device id, when the request carries that device's token (``petah hub add-device``)."""
    check_device_id(device_id)
    if not hub.registry.token_matches(device_id, bearer_token(authorization)):
        raise unauthorized(f"device {device_id}: wrong or missing device token")
    return device_id


DeviceDep = Annotated[str, Depends(authenticated_device)]


def require_hub_admin(request: Request, authorization: Authorization = None) -> None:
    """The hub's admin token (``petah hub serve --admin-token-file``): operators' actions."""
    token = request.app.state.admin_token
    if token is None:
        raise ClientError(403, "operator actions are disabled: start petah hub serve with --admin-token-file")
    if not bearer_matches(authorization, token):
        raise unauthorized("wrong or missing admin bearer token")


def require_reader(request: Request, authorization: Authorization = None) -> None:
    """With ``--read-token-file``, the fleet's status (device ids, versions, drift) takes that token
    or the admin token; without one it is open, as a hub on loopback has been."""
    state = request.app.state
    if state.read_token is None:
        return
    if not any(token is not None and bearer_matches(authorization, token)
               for token in (state.read_token, state.admin_token)):
        raise unauthorized("wrong or missing read bearer token")


def check_id(value, label: str) -> int:
    """A whole number that fits SQLite's integers (a request may carry any size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise ClientError(400, f"{label} must be a whole number in [0, 2^63)")
    return value


__all__ = ["DeviceDep", "HubDep", "authenticated_device", "check_id", "get_hub", "require_hub_admin",
           "require_reader"]
