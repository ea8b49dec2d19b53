"""What devices send, each with its own bearer token: polls (what should I run?) and reports (what
happened)."""

from __future__ import annotations

import math

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from petah.fleet.hub import DirectorUnavailable
from petah.fleet.routers.deps import DeviceDep, HubDep, check_id
from petah.http import ClientError, parse_json, read_body

MAX_REPORT_BYTES = 64 * 1024

router = APIRouter()


async def json_body(request: Request, what: str) -> dict:
    data = parse_json(await read_body(request, MAX_REPORT_BYTES), what)
    if not isinstance(data, dict):
        raise ClientError(400, f"{what} must be a JSON object")
    return data


@router.post("/v1/devices/{device_id}/poll")
async def poll(device: DeviceDep, request: Request, hub: HubDep):
    data = await json_body(request, "the poll body")
    installed = data.get("installed", {})
    if not isinstance(installed, dict) or len(installed) > 256 or not all(isinstance(v, str)
                                                                         for v in installed.values()):
        raise ClientError(400, "installed must map at most 256 task names to sha256 strings")
    installed = {text(k, 64): text(v, 64) for k, v in installed.items()}
    drift = drift_report(data.get("drift", {}))
    try:
        return await run_in_threadpool(hub.poll, device, text(str(data.get("backbone", "")), 64),
                                       installed, text(str(data.get("state", "")), 200), drift)
    except DirectorUnavailable as exc:  # the operator's to fix (a restart with the new key), not the device's
        raise ClientError(503, str(exc)) from None


DRIFT_KEYS = {"state": str, "estimated": float, "input_drift": float, "feature_drift": float, "alarms": int}


def drift_report(value) -> dict[str, dict]:
    """A station's drift summary per task, as the hub keeps it: known keys of the right types only,
    at most 256 tasks (a device is authenticated, not trusted with the hub's storage)."""
    if not isinstance(value, dict) or len(value) > 256:
        raise ClientError(400, "drift must map at most 256 task names to summaries")
    kept = {}
    for task, summary in value.items():
        if not isinstance(task, str) or len(task) > 64 or not isinstance(summary, dict):
            raise ClientError(400, "drift must map task names to summaries")
        kept[task] = {key: (text(summary[key], 20) if kind is str else summary[key])
                      for key, kind in DRIFT_KEYS.items()
                      if isinstance(summary.get(key), kind if kind is not float else int | float)
                      and not isinstance(summary.get(key), bool)
                      and (kind is str or math.isfinite(summary[key]))}  # NaN / Infinity: the status could not be JSON
    return {text(task, 64): summary for task, summary in kept.items()}


def text(value: str, most: int) -> str:
    """A device's text as the hub keeps it: at most ``most`` characters, no NUL (PostgreSQL refuses it)."""
    return value.replace("\x00", "")[:most]


@router.post("/v1/devices/{device_id}/report")
async def report(device: DeviceDep, request: Request, hub: HubDep):
    data = await json_body(request, "the report body")
    release = data.get("release")
    if release is not None:
        check_id(release, "release")
    numbers = [check_id(data.get("bytes", 0), "bytes"), check_id(data.get("retries", 0), "retries")]
    await run_in_threadpool(hub.registry.report, device, str(data.get("event")), release,
                            text(data["task"], 64) if isinstance(data.get("task"), str) else None,
                            text(str(data.get("detail", "")), 500), *numbers)
    return {"ok": True}
