"""Faults the fleet bench injects into the hub's answers (``petah bench fleet``): an ASGI middleware
around the hub's routes, so the production hub carries no fault code.

Each probability applies per request: ``delay`` to every request, ``drop`` to metadata and target
downloads, ``truncate`` and ``corrupt`` to target downloads; ``down`` fails every request.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass, field

from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response


@dataclass
class Faults:
    """What to inject, and how often it was (``counts``); one seeded draw sequence for the run."""
    drop: float = 0.0  # close the connection mid-answer
    truncate: float = 0.0  # send half of a target
    corrupt: float = 0.0  # flip a byte of a target
    delay: float = 0.0  # answer after ``delay_s``
    delay_s: float = 2.0
    down: bool = False  # every request fails (the hub is "down"); the bench switches it while running
    seed: int = 0
    counts: dict = field(default_factory=dict)

    def __post_init__(self):
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def draw(self, kind: str) -> bool:
        p = getattr(self, kind)
        with self._lock:
            hit = p > 0 and self._rng.random() < p
            if hit:
                self.counts[kind] = self.counts.get(kind, 0) + 1
        return hit

    def middleware(self) -> Middleware:
        """For ``create_hub_app`` / ``running_hub``'s ``middleware``."""
        return Middleware(FaultInjection, faults=self)


class FaultInjection:
    """ASGI middleware: the wrapped hub's answers, with ``faults``."""

    def __init__(self, app, faults: Faults):
        self.app, self.faults = app, faults

    async def __call__(self, scope, receive, send):
        faults = self.faults
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if faults.down:
            faults.counts["down"] = faults.counts.get("down", 0) + 1
            return await JSONResponse({"error": "hub down (fault injection)"}, 503)(scope, receive, send)
        if faults.draw("delay"):
            await asyncio.sleep(faults.delay_s)
        path = scope["path"]
        if not path.startswith(("/metadata/", "/targets/")):
            return await self.app(scope, receive, send)
        answer = await Buffered.run(self.app, scope, receive, send)
        if answer is None:  # not a download (an error): passed on as it was
            return
        data = answer.body
        if path.startswith("/targets/") and (faults.truncate or faults.corrupt):
            if faults.draw("truncate"):
                return await Response(data[: len(data) // 2], media_type="application/octet-stream")(
                    scope, receive, send)
            if faults.draw("corrupt"):
                flipped = bytearray(data)
                flipped[len(data) // 2] ^= 0xFF
                return await Response(bytes(flipped), media_type="application/octet-stream")(scope, receive, send)
        if faults.draw("drop"):  # the whole length announced, a third sent, then the connection goes
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-length", str(len(data)).encode())]})
            await send({"type": "http.response.body", "body": data[: len(data) // 3], "more_body": True})
            raise ConnectionAbortedError("fault injection: connection dropped")
        await answer.replay(send)


@dataclass
class Buffered:
    """A 200 answer of the wrapped app, held back whole (files the hub serves fit in memory)."""
    start: dict
    body: bytes

    @classmethod
    async def run(cls, app, scope, receive, send) -> Buffered | None:
        """Run ``app``: a 200 answer is returned unsent; any other goes to ``send`` (None returned)."""
        start, chunks, passing = None, [], False

        async def hold(message):
            nonlocal start, passing
            if message["type"] == "http.response.start":
                start, passing = message, message["status"] != 200
                if passing:
                    await send(message)
            elif passing:
                await send(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await app(scope, receive, hold)
        return None if passing or start is None else cls(start, b"".join(chunks))

    async def replay(self, send) -> None:
        await send(self.start)
        await send({"type": "http.response.body", "body": self.body})


__all__ = ["FaultInjection", "Faults"]
