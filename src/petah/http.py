"""What the station's and the hub's HTTP faces share: one error type for clients, bounded bodies,
multipart forms and JSON (everything a request carries is untrusted and size- and depth-limited)."""

from __future__ import annotations

import json
import re
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


MAX_JSON_DEPTH = 32  # nested arrays / objects; the deepest JSON petah exchanges (TUF metadata) has 5
# a JSON string: anything but quote and backslash, or a backslash and the byte it escapes (possessive,
# so a long string keeps no backtracking state)
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether UTF-8 JSON text nests arrays / objects deeper than ``limit``, found without recursing.

    json.loads recurses once per level in its C scanner (30,000 levels in 60 KB end in
    RecursionError), and neither it (an object_hook runs after the recursion) nor any library
    petah depends on bounds the depth before parsing; so a linear pre-scan: strings dropped (a
    bracket in a string does not count), every other byte but brackets dropped, then the running
    depth (a cumulative sum, in chunks). All of it runs in C (regex, bytes, numpy), so a 64 MB body
    costs a fraction of a second, not one Python step per byte. Brackets that close more than they
    opened are not JSON: answered False (json.loads refuses the text next)."""
    import numpy as np

    brackets = _JSON_STRING.sub(b"", data).translate(_ONE_BRACKET, _NOT_BRACKETS)
    steps = 92 - np.frombuffer(brackets, dtype=np.uint8).astype(np.int8)  # "[" (91): +1, "]" (93): -1
    depth, chunk = 0, 1 << 20
    for start in range(0, len(steps), chunk):
        levels = depth + np.cumsum(steps[start:start + chunk], dtype=np.int64)
        deep, negative = np.flatnonzero(levels > limit), np.flatnonzero(levels < 0)
        if len(deep) or len(negative):
            return bool(len(deep)) and (not len(negative) or deep[0] < negative[0])
        depth = int(levels[-1])
    return False


def parse_json(body: bytes, what: str, limit: int = MAX_JSON_DEPTH):
    """A request's JSON ``body``; refused (400, naming ``what``: "the report body") when it is not
    UTF-8 JSON or nests deeper than ``limit`` levels."""
    too_deep = ClientError(400, f"{what} nests deeper than {limit} levels")
    try:
        text = body.decode("utf-8")  # RFC 8259: JSON between systems is UTF-8 (and the scan reads it so)
    except UnicodeDecodeError:
        raise ClientError(400, f"{what} must be JSON (UTF-8)") from None
    if json_too_deep(body, limit):
        raise too_deep
    try:
        return json.loads(text)
    except RecursionError:  # the scan above should make this unreachable; never a 500
        raise too_deep from None
    except ValueError:
        raise ClientError(400, f"{what} must be JSON") from None


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a child server told its port before it starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


__all__ = ["MAX_JSON_DEPTH", "ClientError", "form_files", "free_port", "json_too_deep", "listen", "parse_form",
           "parse_json", "read_body", "read_token"]
