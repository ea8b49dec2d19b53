"""Serving an ASGI app (the station, the hub) with uvicorn so that idle or slow clients cannot take
it down for everyone.

uvicorn 0.55 alone falls over to a few hundred idle sockets (measured: 280 connections that send
nothing gave every request, ``/healthz`` included, 503 for as long as they stayed open):
``limit_concurrency`` counts *connections*, and a connection that never sends a byte has no
timeout (its keep-alive timer starts only after a first response). Another server would be a new
dependency of the device install for three timers, so petah keeps uvicorn's h11 protocol and adds
them (``GuardedH11Protocol``):

- a **header deadline**: a request's headers must be complete within ``header_timeout_s`` of its
  first byte (of the connection, for the first request) — an idle socket or a slowloris client
  that trickles header lines is closed;
- a **body idle timeout**: a request body that stops arriving for ``body_timeout_s`` is closed;
- a **connection cap with eviction**: past ``max_connections`` open sockets (kept under the
  process's file limit), a new connection closes the longest-idle connection that has no request
  in progress, instead of the newcomer being refused — a flood of idle sockets costs its own
  sockets, never a working client's request.

The in-flight limit counts requests (``InFlightLimit``), not sockets, and never applies to
``/healthz``: a busy station still says it is alive.
"""

from __future__ import annotations

import asyncio
import resource
import socket
import time

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

RESERVED_FILES = 64  # file descriptors left for everything but client sockets (packages, logs, metadata)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline, a body idle timeout and idle eviction at a
    connection cap. Settings are class attributes: ``guarded_protocol`` makes a subclass per server."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 4096

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self.last_active = time.monotonic()

    # --- connection life ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self._evict_idle()
        self._arm(self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_active = time.monotonic()
        starting = self._deadline is None and self.conn.their_state is h11.IDLE
        super().data_received(data)
        if self.transport.is_closing():
            return
        state = self.conn.their_state
        if state is h11.IDLE:  # headers still incomplete: the deadline runs from this request's first byte
            if starting:
                self._arm(self.header_timeout_s)
        elif state is h11.SEND_BODY:  # the body keeps coming, or the connection goes
            self._arm(self.body_timeout_s)
        else:
            self._disarm()

    def on_response_complete(self) -> None:
        self.last_active = time.monotonic()
        super().on_response_complete()  # arms uvicorn's keep-alive timer for the idle wait

    # --- timers -----------------------------------------------------------------------------------
    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self.flow.read_paused:  # the app has not taken the body yet: the client is not the slow one
            self._arm(self.body_timeout_s)
        elif not self.transport.is_closing():
            self.transport.close()

    # --- the cap ------------------------------------------------------------------------------------
    def is_idle(self) -> bool:
        """No request in progress: between requests of a keep-alive connection, or before the first."""
        return (self.cycle is None or self.cycle.response_complete) and self.conn.their_state is h11.IDLE

    def _evict_idle(self) -> None:
        idle = [c for c in self.connections if c is not self and isinstance(c, GuardedH11Protocol) and c.is_idle()
                and not c.transport.is_closing()]
        if idle:
            min(idle, key=lambda c: c.last_active).transport.close()
        else:  # every other socket has a request in progress: this one waits its turn closed
            self.transport.close()


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {
        "header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
        "max_connections": min(max_connections, socket_allowance())})


def socket_allowance() -> int:
    """How many client sockets this process can hold: its file limit raised to the hard limit
    (the default soft limit is often 1024), less what the server needs for itself."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        wanted = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass
    return max(16, soft - RESERVED_FILES)


class InFlightLimit:
    """ASGI middleware: past ``limit`` requests in progress, new ones get 503 with Retry-After
    (their bodies could hold memory without bound); the ``exempt`` paths always pass."""

    def __init__(self, app, limit: int, exempt: tuple[str, ...] = ("/healthz",)):
        self.app, self.limit, self.exempt = app, limit, exempt
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.exempt:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.limit:
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1")]})
            await send({"type": "http.response.body",
                        "body": b'{"error": "the server has too many requests in progress; retry shortly"}'})
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def guarded_server(app, *, max_requests: int, header_timeout_s: float = 10.0, body_timeout_s: float = 30.0,
                   max_connections: int = 4096, **uvicorn_options) -> uvicorn.Server:
    """A uvicorn server for ``app`` with the guards above (``uvicorn_options`` go to its Config)."""
    config = uvicorn.Config(InFlightLimit(app, max_requests), http=guarded_protocol(
        header_timeout_s, body_timeout_s, max_connections), log_level=uvicorn_options.pop("log_level", "warning"),
        **uvicorn_options)
    return uvicorn.Server(config)


def serve_guarded(app, sock: socket.socket, **options) -> None:
    """Serve ``app`` on the bound socket ``sock`` until SIGTERM / Ctrl-C (see ``guarded_server``)."""
    guarded_server(app, **options).run(sockets=[sock])


__all__ = ["GuardedH11Protocol", "InFlightLimit", "guarded_server", "serve_guarded", "socket_allowance"]
