"""The hub's HTTP face (FastAPI): one router per resource (``petah.fleet.routers``), put together
here, and a hub served on a thread of this process (tests, ``petah bench fleet``).

Errors the hub answers are ``{"error": "…"}``, and nothing internal leaves the process; FastAPI's
own (no such path, wrong method, a release id that is not a number) keep its ``{"detail": …}``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence

from fastapi import FastAPI
from starlette.middleware import Middleware

from petah.errors import PetahError
from petah.fleet.hub import Hub
from petah.fleet.routers import devices, health, page, releases, repository
from petah.http import listen
from petah.http_app import add_error_handlers, mount_static, new_app
from petah.http_server import guarded_server

HUB_MAX_REQUESTS = 1024  # requests in progress at once (each body is bounded); past it 503 with Retry-After


def create_hub_app(hub: Hub, middleware: Sequence[Middleware] = (), *, admin_token: str | None = None,
                   read_token: str | None = None) -> FastAPI:
    """The hub's app; ``middleware`` wraps its routes (inside the error handlers: the fleet bench
    injects its faults this way); ``admin_token`` opens the operators' actions, ``read_token`` (or
    the admin token) the fleet's status, open without one."""
    app = new_app("petah hub", middleware=list(middleware))  # the schema stays open at /openapi.json
    app.state.hub = hub
    app.state.admin_token, app.state.read_token = admin_token, read_token
    add_error_handlers(app, "hub", framework_errors=False)
    for router in (repository, releases, devices, health, page):  # in this order: the schema lists the paths so
        app.include_router(router.router)
    mount_static(app, page.STATIC)
    return app


@contextlib.contextmanager
def running_hub(hub: Hub, *, middleware: Sequence[Middleware] = (), host: str = "127.0.0.1", port: int = 0,
                log_level: str = "warning", admin_token: str | None = None, read_token: str | None = None, **guards):
    """The hub served by uvicorn on a thread of this process (tests, ``petah bench fleet``); yields
    its URL and the server (``server.should_exit``); ``middleware`` and the tokens go to
    ``create_hub_app``, ``guards`` to ``guarded_server``."""
    sock = listen(host, port)
    app = create_hub_app(hub, middleware, admin_token=admin_token, read_token=read_token)
    server = guarded_server(app, max_requests=HUB_MAX_REQUESTS, log_level=log_level, lifespan="off", **guards)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise PetahError("the hub did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


__all__ = ["HUB_MAX_REQUESTS", "Hub", "create_hub_app", "running_hub"]
