"""Talk to a station from Python, and start one as a child process (tests and ``petah bench serve``).

Standard library only (http.client), so a script on a line PC needs nothing else. One
``StationClient`` holds one keep-alive connection: give each thread its own.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from petah.errors import PetahError


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def multipart(files: list[tuple[str, bytes]], fields: dict[str, str] | None = None,
              field: str = "image") -> tuple[bytes, str]:
    """A multipart/form-data body with each file in ``field``; returns it and its content type."""
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class StationClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise PetahError(f"StationClient speaks plain http to a station on this machine, not {url!r}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.token, self.timeout = token, timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                token: str | None = None) -> Reply:
        headers = dict(headers or {})
        if token or self.token:
            headers["Authorization"] = f"Bearer {token or self.token}"
        while True:
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
                self._conn.connect()
                # http.client sends headers and body in two writes: let the second go out at once
                # rather than wait for the first one's (delayed) ACK
                self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                self._conn.request(method, path, body=body, headers=headers)
                response = self._conn.getresponse()
                return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
            except (ConnectionError, http.client.HTTPException, OSError) as exc:
                self.close()
                # only a kept-alive connection the server had closed before reading the request is
                # retried; after a timeout the request may have run (a rollback must not run twice)
                closed_by_server = isinstance(exc, http.client.RemoteDisconnected | BrokenPipeError |
                                              ConnectionResetError)
                if not (reused and closed_by_server):
                    raise

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def predict(self, images: list[tuple[str, bytes]], tasks: list[str] | None = None) -> Reply:
        body, content_type = multipart(images, {"tasks": ",".join(tasks)} if tasks else None)
        return self.request("POST", "/v1/predict", body, {"Content-Type": content_type})

    def tasks(self) -> list[dict]:
        return self.request("GET", "/v1/tasks").json()["tasks"]

    def install(self, name: str, package: bytes, admin_token: str) -> Reply:
        return self.request("PUT", f"/v1/tasks/{quote(name)}", package, token=admin_token)

    def rollback(self, name: str, admin_token: str) -> Reply:
        return self.request("POST", f"/v1/tasks/{quote(name)}/rollback", token=admin_token)

    def delete(self, name: str, admin_token: str) -> Reply:
        return self.request("DELETE", f"/v1/tasks/{quote(name)}", token=admin_token)


STARTED = re.compile(r"petah station: \d+ task\(s\) on (https?://\S+?)/? ")


@contextlib.contextmanager
def station_process(*args: str, timeout: float = 120.0, env: dict | None = None,
                    python: str | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """``petah serve ARGS --port 0`` as a child process (of ``python``: another environment's
    interpreter, e.g. a device install); yields it and its URL once it answers, and stops it
    (SIGTERM, then SIGKILL after 30 s) on the way out."""
    proc = subprocess.Popen([python or sys.executable, "-m", "petah", "serve", *args, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    found: list[str] = []
    errors: collections.deque[str] = collections.deque(maxlen=50)  # both pipes are drained: a full one blocks

    def read_stdout():
        for line in proc.stdout:
            match = STARTED.search(line)
            if match and not found:
                found.append(match.group(1))

    threading.Thread(target=read_stdout, daemon=True).start()
    threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True).start()
    try:
        deadline = time.monotonic() + timeout
        while not found:
            if proc.poll() is not None:
                proc.wait()
                time.sleep(0.2)  # let the reader take the last lines
                raise PetahError(f"petah serve exited with {proc.returncode}: {''.join(errors).strip()}")
            if time.monotonic() > deadline:
                raise PetahError(f"petah serve did not start within {timeout:.0f} s")
            time.sleep(0.05)
        yield proc, found[0]
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


__all__ = ["Reply", "StationClient", "multipart", "station_process"]
