"""The inspection page: static files with no data in them, so no token (the page asks the API with
the token its user gives)."""

from __future__ import annotations

from importlib import resources

from petah.http_app import static_page_router

STATIC = resources.files("petah") / "serve" / "static"
router = static_page_router(STATIC)
