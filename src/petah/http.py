"""What the station's and the hub's HTTP faces share: one error type for clients, bounded bodies
and multipart forms (everything a request carries is untrusted and size-limited)."""

from __future__ import annotations

import socket

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from petah.errors import PetahError


class ClientError(Exception):
    """An error the client caused: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it passes ``limit`` bytes, declared or streamed."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ClientError(400, "invalid Content-Length header")
        if int(declared) > limit:
            raise ClientError(413, f"the request body ({int(declared)} bytes) is over the limit of {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ClientError(413, f"the request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(data: bytes):
    yield data


async def parse_form(request: Request, body: bytes, max_files: int):
    """A multipart/form-data body (already read and size-checked) as starlette's FormData."""
    parser = MultiPartParser(request.headers, _once(body), max_files=max_files, max_fields=16)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ClientError(400, f"malformed multipart body: {exc.message}") from None


async def form_files(request: Request, body: bytes, names: tuple[str, ...]) -> dict[str, bytes]:
    """Named fields of a multipart body as bytes (a file or a text field); each must be there."""
    form = await parse_form(request, body, len(names))
    parts = {}
    for name in names:
        item = form.get(name)
        if item is None:
            raise ClientError(400, f"the multipart body has no field {name!r}")
        parts[name] = await item.read() if isinstance(item, UploadFile) else item.encode()
    return parts


def listen(host: str, port: int) -> socket.socket:
    """A listening socket for uvicorn, bound before the server starts (so port 0 can be printed,
    and a taken port fails before anything loads)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without, a keep-alive client waited ~40 ms per response
    # (the response's second write held back by Nagle until the client's delayed ACK)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # clients queue in the backlog until the server accepts
    except OSError as exc:
        sock.close()
        raise PetahError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def read_token(path: str | None, label: str) -> str | None:
    """A bearer token from its file (first line, stripped); an empty or short one is refused."""
    if not path:
        return None
    try:
        token = open(path, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise PetahError(f"{label} {path}: cannot read it ({exc.__class__.__name__})") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise PetahError(f"{label} {path}: the token must be one line of at least 16 characters without spaces")
    return token


__all__ = ["ClientError", "form_files", "listen", "parse_form", "read_body", "read_token"]
