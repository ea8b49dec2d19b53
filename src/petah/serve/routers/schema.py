"""/openapi.json behind the API token (FastAPI's own would answer without it)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from petah.serve.routers.deps import require_api_token

router = APIRouter(dependencies=[Depends(require_api_token)])


@router.get("/openapi.json", include_in_schema=False)
def openapi_schema(request: Request):
    return JSONResponse(request.app.openapi())
