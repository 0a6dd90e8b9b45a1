"""`GET /health`, `GET /metrics` (Prometheus) and `GET /v1/models` (the base model and every adapter)."""

from __future__ import annotations

from pathlib import Path

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from softprompt.serve.adapters import scan_adapters
from softprompt.serve.errors import ServeError
from softprompt.serve.http import check_key, error_response, server_of
from softprompt.serve.metrics import CONTENT_TYPE
from softprompt.serve.schemas import ModelCard, ModelList


async def health(request: Request) -> Response:
    try:
        server_of(request).ready_engine()
    except ServeError as err:
        return error_response(err)
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:

    server = server_of(request)
    server.metrics.queue.set(server.scheduler.queue_depth)
    if server.engine is not None:
        server.engine.observe(server.metrics)
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)


async def models(request: Request) -> Response:

    server = server_of(request)
    check_key(server, request)
    engine = server.ready_engine()
    length = engine.context_length
    cards = [ModelCard(id=server.base_id, created=server.created, root=server.base_id, max_model_len=length)]
    listed = engine.adapters()
    for root in server.config.adapters_dirs:  # not loaded yet: served on their first request
        for name, path in scan_adapters(Path(root)).items():
            listed.setdefault(name, path)
    for name, path in sorted(listed.items()):
        cards.append(
            ModelCard(
                id=name, created=server.created, root=str(path), parent=server.base_id, max_model_len=length
            )
        )
    return JSONResponse(ModelList(data=cards).model_dump())


ROUTES = [
    ("GET", "/health", health),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/models", models),
]
