"""The station: one resident backbone serving every task package over HTTP, with a web page.

``Station`` holds the engine, the inference thread and the state folder; ``create_app`` puts the
HTTP API in front of it; ``run_station`` binds and serves until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
from importlib import resources
from pathlib import Path

from petah import DEMO_BACKBONE
from petah.device import HEAD_KINDS, read_device_backbone
from petah.device.bundle import MANIFEST_FILE
from petah.errors import PetahError
from petah.http import listen
from petah.packages import read_manifest
from petah.serve.config import ENGINES, ServeConfig
from petah.serve.station import Station, TaskRecord, UnknownTask, Upload

# the packages `petah demo` writes with the petah plan, and its anomaly task (assets/README.md)
DEMO_PACKAGES = ("digits", "textures", "defects", "digit-boxes", "surfaces")


def _assets() -> Path:
    return Path(str(resources.files("petah") / "assets"))


def demo_device_files() -> tuple[Path, Path]:
    """The bundled demo's device backbone: its folder (graph + device.json) and the weights file it
    shares with the demo backbone."""
    return _assets() / "demo" / "device", _assets() / DEMO_BACKBONE


def demo_device_backbone():
    folder, weights = demo_device_files()
    return read_device_backbone(folder, weights=weights)


def demo_on_device(engine: str) -> bool:
    """Whether ``serve --demo`` runs on the device engine: asked for, or the install has no torch."""
    return engine == "device" or (engine == "auto" and importlib.util.find_spec("torch") is None)


def demo_packages(on_device: bool = False) -> list[Path]:
    """The bundled demo packages (see assets/README.md), for the bundled demo backbone; on the
    device engine, those of the task kinds it runs."""
    paths = [_assets() / "demo" / f"{name}.petah" for name in DEMO_PACKAGES]
    return [p for p in paths if read_manifest(p).task.kind in HEAD_KINDS] if on_device else paths


def station_backbone(spec: str | None, weights: str = "none", img_size: int | None = None, *,
                     demo: bool = False, engine: str = "auto"):
    """What the station serves on: a device backbone folder (no torch), or on the full install a
    backbone file / timm name; ``demo``: the bundled demo backbone in the form the engine runs."""
    if demo and demo_on_device(engine):
        return demo_device_backbone()
    if spec is not None and (Path(spec) / MANIFEST_FILE).is_file():
        return read_device_backbone(spec)
    try:
        from petah.runtime import demo_backbone_path, resolve_backbone
    except ImportError as exc:
        what = "--demo" if demo else f"-b {spec}"
        raise PetahError(f"{what}: this install has no {exc.name} (a device install): give a device backbone folder "
                         "(petah export --device on a build machine), or --engine device / auto") from None
    return resolve_backbone(str(demo_backbone_path()) if demo else spec, weights=weights, img_size=img_size)


def bind(config: ServeConfig) -> socket.socket:
    """The station's listening socket, bound before the server starts (so port 0 can be printed)."""
    return listen(config.host, config.port)


def run_station(station: Station, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM / Ctrl-C; in-flight requests finish first (uvicorn's graceful shutdown)."""
    from petah.http_server import serve_guarded
    from petah.serve.app import create_app

    config = station.config
    sock = sock or bind(config)
    app = create_app(station)
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"petah station: {len(station.tasks)} task(s) on {scheme}://{shown}:{port}/ (engine {station.engine.name})",
          file=sys.stdout, flush=True)
    serve_guarded(app, sock, max_requests=config.queue_size * 4 + 16, header_timeout_s=config.header_timeout_s,
                  max_connections=config.max_connections, ssl_keyfile=config.ssl_keyfile,
                  ssl_certfile=config.ssl_certfile, timeout_graceful_shutdown=30)


__all__ = ["DEMO_PACKAGES", "ENGINES", "ServeConfig", "Station", "TaskRecord", "UnknownTask", "Upload", "bind",
           "demo_device_backbone", "demo_device_files", "demo_on_device", "demo_packages", "station_backbone",
           "run_station"]
