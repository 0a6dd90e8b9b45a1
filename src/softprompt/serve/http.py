"""What every route shares: the OpenAI error envelope, the request body (size, UTF-8, JSON,
schema), the API key, the server's state, work run on the engine's thread, the adapter a
request's `model` names, and the folders adapters may be loaded from."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.serve.errors import Forbidden, NotFound, Overloaded, ServeError, TooLarge, Unauthorized
from softprompt.serve.request import Job
from softprompt.serve.schemas import error_body
from softprompt.serve.server import Server

logger = logging.getLogger(__name__)

_Body = TypeVar("_Body", bound=BaseModel)


def error_response(err: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(int(err.retry_after))} if isinstance(err, Overloaded) else None
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status, headers=headers)


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not a valid JSON number")


async def parse_body(request: Request, schema: type[BaseModel], limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise TooLarge(f"the request body is {length} bytes; at most {limit} are accepted.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"the request body is over {limit} bytes.")
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ServeError(f"the request body is not valid UTF-8 (byte {err.start}).") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ServeError(f"the request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ServeError("the request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        param = loc[0] if loc else None
        where = ".".join(loc)
        message = first.get("msg", "invalid request")
        raise ServeError(f"{where + ': ' if where else ''}{message}", param=param) from None


def check_key(server: Server, request: Request) -> None:
    key = server.config.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), key.encode("utf-8")):
        raise Unauthorized("a valid API key is required (Authorization: Bearer <key>).")


def server_of(request: Request) -> Server:
    return request.app.state.server


async def run_job(server: Server, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the model worker's thread (between decode steps) and await its result."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def done(job: Job) -> None:
        def settle() -> None:
            if not future.done():
                future.set_result(job)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop is closed (shutdown)
            pass

    server.scheduler.submit_job(Job(fn, on_done=done))
    job = await future
    if job.error is not None:
        if isinstance(job.error, ServeError):
            raise job.error
        raise ServeError(f"{type(job.error).__name__}: {job.error}")
    return job.result


async def resolve_model(server: Server, name: str) -> str | None:
    """The served adapter for a request's `model` (None: the bare model); a folder added
    under `--adapters` after start-up is loaded here, on its first request."""
    engine = server.ready_engine()
    if name == server.base_id:
        return None
    if engine.has_adapter(name):
        return name
    path = engine.find_on_disk(name)
    if path is not None:

        def load() -> None:
            if not engine.has_adapter(name):
                engine.load_adapter_now(name, path)

        await run_job(server, load)
        return name
    raise NotFound(f"the model {name!r} does not exist; GET /v1/models lists the served ones.", param="model")


def allowed_path(server: Server, path: str) -> Path:
    """`path` resolved, if it lies under a folder this server may load adapters from."""
    target = Path(path).expanduser().resolve()
    for root in server.roots:
        if target == root or root in target.parents:
            return target
    raise Forbidden(
        f"{path!r} is not under a folder this server may load from "
        f"({', '.join(map(str, server.roots)) or 'none: start with --adapters or --adapter-root'}).",
        param="path",
    )


async def checked_body(request: Request, schema: type[_Body], update: bool = False) -> tuple[Server, _Body]:
    """The route's `Server` and its request body as `schema`, once the API key is checked
    (and, for an `update` of the server's adapters, that updates are allowed)."""
    server = server_of(request)
    check_key(server, request)
    if update:
        check_updates_allowed(server)
    return server, await parse_body(request, schema, server.config.max_body_bytes)


def check_updates_allowed(server: Server) -> None:
    if not server.config.allow_adapter_updates:
        raise Forbidden("adapter updates are off; start the server with --allow-adapter-updates.")


async def on_serve_error(request: Request, err: ServeError) -> JSONResponse:
    return error_response(err)


async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(err.detail), kind, None, None), err.status_code)


async def on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {err}", "server_error", None, "internal_error"), 500)
