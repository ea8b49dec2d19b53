"""The station: one resident backbone serving every task package over HTTP, with a web page.

``Station`` holds the engine, the inference thread and the state folder; ``create_app`` puts the
HTTP API in front of it; ``run_station`` binds and serves until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import socket
import sys
from importlib import resources
from pathlib import Path

from petah.http import listen
from petah.serve.config import ENGINES, ServeConfig
from petah.serve.station import Station, TaskRecord, UnknownTask, Upload

# the packages `petah demo` writes with the petah plan, and its anomaly task (assets/README.md)
DEMO_PACKAGES = ("digits", "textures", "defects", "digit-boxes", "surfaces")


def demo_packages() -> list[Path]:
    """The bundled demo packages (see assets/README.md), for the bundled demo backbone."""
    folder = resources.files("petah") / "assets" / "demo"
    return [Path(str(folder / f"{name}.petah")) for name in DEMO_PACKAGES]


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
           "demo_packages", "run_station"]
