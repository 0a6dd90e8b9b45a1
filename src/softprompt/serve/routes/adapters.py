"""`POST /v1/load_adapter` and `POST /v1/unload_adapter` (only with `--allow-adapter-updates`)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from softprompt.serve.http import allowed_path, checked_body, run_job
from softprompt.serve.schemas import LoadAdapterRequest, UnloadAdapterRequest


async def load_adapter(request: Request) -> Response:
    server, body = await checked_body(request, LoadAdapterRequest, update=True)
    engine = server.ready_engine()
    path = allowed_path(server, body.path)
    await run_job(server, lambda: engine.load_adapter_now(body.name, path))
    return JSONResponse({"status": "ok", "name": body.name, "path": str(path)})


async def unload_adapter(request: Request) -> Response:
    server, body = await checked_body(request, UnloadAdapterRequest, update=True)
    engine = server.ready_engine()
    await run_job(server, lambda: engine.unload_adapter_now(body.name))
    return JSONResponse({"status": "ok", "name": body.name})


ROUTES = [
    ("POST", "/v1/load_adapter", load_adapter),
    ("POST", "/v1/unload_adapter", unload_adapter),
]
