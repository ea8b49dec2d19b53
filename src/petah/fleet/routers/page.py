"""The hub's page at ``/``: static files with no data in them, so no token; the page asks the API
with the admin token its operator gives (pause / resume / roll back take it, and the status does
when the hub has a read token)."""

from __future__ import annotations

from importlib import resources

from petah.http_app import static_page_router

STATIC = resources.files("petah") / "fleet" / "static"
router = static_page_router(STATIC)
