"""The HTTP layer's assembly: the FastAPI application with its routes (`routes/`, one module
per endpoint group), the error envelope for every error (`http`), and the model loaded in
the background at start-up (`server`).

The HTTP layer turns JSON into `GenerationRequest`s (`planning`) and events back into
OpenAI-shaped JSON or server-sent events (`streaming`); it never touches tensors
(tokenization aside) and never calls the model: everything model-side goes through the
scheduler to the engine's thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.serve.errors import ServeError
from softprompt.serve.http import on_http_error, on_serve_error, on_unexpected_error
from softprompt.serve.routes import ROUTES
from softprompt.serve.server import ServeConfig, Server


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model in the background (/health answers 503 meanwhile); drain at shutdown."""
    server: Server = app.state.server
    thread = threading.Thread(target=server.load, name="softprompt-load", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.state = "stopping" if server.state == "ready" else server.state
        if server.engine is not None:
            await asyncio.to_thread(server.engine.stop, server.config.drain_seconds)


def create_app(config: ServeConfig, loader: Callable[[], tuple[Any, Any]] | None = None) -> FastAPI:
    """The FastAPI application. `loader` gives `(SoftPromptModel, tokenizer)` (default: load
    `config.model` with a placeholder adapter); it runs in the background at start-up,
    while `/health` answers 503."""
    app = FastAPI(title="softprompt", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = Server(config, loader)
    # Every error leaves as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.
    app.add_exception_handler(ServeError, on_serve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


__all__ = ["ROUTES", "ServeConfig", "Server", "create_app"]
