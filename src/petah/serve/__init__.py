"""The station: one resident backbone serving every task package over HTTP, with a web page.

``Station`` holds the engine, the inference thread and the state folder; ``create_app`` puts the
HTTP API in front of it; ``run_station`` binds and serves until SIGTERM / Ctrl-C.
"""

from __future__ import annotations

import socket
import sys
from importlib import resources
from pathlib import Path

from petah.errors import PetahError
from petah.serve.config import ENGINES, ServeConfig
from petah.serve.station import Station, TaskRecord, UnknownTask, Upload

DEMO_PACKAGES = ("digits", "textures", "defects", "digit-boxes")  # petah-plan packages of `petah demo`


def demo_packages() -> list[Path]:
    """The bundled demo packages (see assets/README.md), for the bundled demo backbone."""
    folder = resources.files("petah") / "assets" / "demo"
    return [Path(str(folder / f"{name}.petah")) for name in DEMO_PACKAGES]


def bind(config: ServeConfig) -> socket.socket:
    """The listening socket, bound before the server starts (so port 0 can be printed)."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without, a keep-alive client waited ~40 ms per response
    # (the response's second write held back by Nagle until the client's delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((config.host, config.port))
        sock.listen(2048)  # clients queue in the backlog until the server accepts
    except OSError as exc:
        sock.close()
        raise PetahError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from None
    return sock


def run_station(station: Station, sock: socket.socket | None = None) -> None:
    """Serve until SIGTERM / Ctrl-C; in-flight requests finish first (uvicorn's graceful shutdown)."""
    import uvicorn

    from petah.serve.app import create_app

    config = station.config
    sock = sock or bind(config)
    app = create_app(station)
    host, port = sock.getsockname()[:2]
    scheme = "https" if config.ssl_certfile else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"petah station: {len(station.tasks)} task(s) on {scheme}://{shown}:{port}/ (engine {station.engine.name})",
          file=sys.stdout, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", ssl_keyfile=config.ssl_keyfile,
                                           ssl_certfile=config.ssl_certfile, timeout_graceful_shutdown=30,
                                           limit_concurrency=config.queue_size * 4 + 16))
    server.run(sockets=[sock])


__all__ = ["DEMO_PACKAGES", "ENGINES", "ServeConfig", "Station", "TaskRecord", "UnknownTask", "Upload", "bind",
           "demo_packages", "run_station"]
