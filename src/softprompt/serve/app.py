"""The HTTP layer: FastAPI routes, request parsing and the OpenAI error envelope.

It turns JSON into `GenerationRequest`s and events back into OpenAI-shaped JSON or
server-sent events; it never touches tensors (tokenization aside) and never calls the
model: everything model-side goes through the scheduler to the engine's thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .request import (
    Event,
    GenerationRequest,
    Job,
    NotFound,
    Overloaded,
    SamplingParams,
    ServeError,
    Unavailable,
)
from .schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChoiceLogprobs,
    ClassifyRequest,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    LoadAdapterRequest,
    ModelCard,
    ModelList,
    TokenLogprob,
    TopLogprob,
    UnloadAdapterRequest,
    Usage,
    error_body,
)

logger = logging.getLogger(__name__)

_Body = TypeVar("_Body", bound=BaseModel)


@dataclass
class ServeConfig:
    """How the server runs (the `softprompt serve` options).

    Attributes:
        model: Base model id or folder (None: the packaged default model).
        base_id: The name clients use for the bare model (default: `model`, or the
            default model's name).
        adapters: Adapters served from the start, name -> folder.
        adapters_dirs: Folders whose sub-folders are adapters (by folder name), loaded
            at start and, when added later, on their first request.
        adapter_roots: Further folders `/v1/load_adapter` may load from.
        max_batch_size: Sequences decoded together at most.
        max_queue: Requests waiting at most (more get 429).
        prompt_cache_mb: Memory budget of the prompts' KV (None: unbounded).
        allow_adapter_updates: Enable `/v1/load_adapter` and `/v1/unload_adapter`.
        allow_base_mismatch: Serve adapters saved from a different base model of the same
            width (refused by default: 400 `base_model_mismatch` at load time).
        api_key: Require `Authorization: Bearer <key>` on /v1 routes.
        max_body_bytes: Larger request bodies get 413.
        drain_seconds: At shutdown, how long running requests may take to finish.
        packed: Packed steps (see `softprompt.serve.packed`); None: where the model
            passes the engine's start-up check; False: padded batches.
        prefill_tokens: Prompt tokens prefilled per step at most (packed steps).
        device: Where the model runs: auto (the first GPU if there is one, else the CPU),
            cpu, cuda, cuda:N or mps, as for `softprompt train`.
        dtype: The weights' dtype: auto (bfloat16 on a GPU that has it, float16 on one that
            does not, float32 on the CPU), float32, bfloat16 or float16.
        engine: "builtin" (this process runs the model) or "vllm" (a vLLM server does, see
            `softprompt.serve.vllm_engine`; this process keeps the tokenizer and embeddings).
        vllm: Where vLLM is, a `softprompt.serve.vllm_engine.VllmSettings` (engine "vllm").
    """

    model: str | None = None
    base_id: str | None = None
    adapters: dict[str, str] = field(default_factory=dict)
    adapters_dirs: list[str] = field(default_factory=list)
    adapter_roots: list[str] = field(default_factory=list)
    max_batch_size: int = 32
    max_queue: int = 256
    prompt_cache_mb: float | None = None
    allow_adapter_updates: bool = False
    allow_base_mismatch: bool = False
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    drain_seconds: float = 30.0
    packed: bool | None = None
    prefill_tokens: int = 256
    device: str = "auto"
    dtype: str = "auto"
    engine: str = "builtin"
    vllm: Any = None

    def __post_init__(self) -> None:
        if self.engine not in ("builtin", "vllm"):
            raise ValueError(f"engine must be builtin or vllm; got {self.engine!r}.")
        if self.engine == "vllm" and self.vllm is None:
            raise ValueError("engine='vllm' needs vllm=VllmSettings(url=...): where vLLM serves the model.")

    def resolved_base_id(self) -> str:
        if self.base_id:
            return self.base_id
        if self.model:
            return self.model
        from ..base_models import DEFAULT_MODEL

        return DEFAULT_MODEL


class _Server:
    """What the routes share: the engine once loaded, the scheduler, metrics, state."""

    def __init__(self, config: ServeConfig, loader: Callable[[], tuple[Any, Any]] | None) -> None:
        from .metrics import Metrics
        from .scheduler import Scheduler

        self.config = config
        self.base_id = config.resolved_base_id()
        self.loader = loader
        self.metrics = Metrics()
        self.scheduler = Scheduler(max_batch_size=config.max_batch_size, max_queue=config.max_queue)
        self.engine: Any = None
        self.tokenizer: Any = None
        self.state = "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self.roots = [Path(p).resolve() for p in (*config.adapters_dirs, *config.adapter_roots)]

    def load(self) -> None:
        """Load the model and the start-up adapters, then start the engine (own thread)."""
        try:
            from .adapters import scan_adapters

            model, tokenizer = (self.loader or _default_loader(self.config))()
            engine = _build_engine(self, model, tokenizer)
            for root in self.config.adapters_dirs:
                for name, path in scan_adapters(Path(root)).items():
                    try:
                        engine.load_adapter_now(name, path)
                    except ServeError as err:  # one broken folder does not stop the others
                        logger.error("not serving %s: %s", name, err.message)
            for name, path in self.config.adapters.items():
                engine.load_adapter_now(name, path)
            engine.start()
            self.tokenizer, self.engine, self.state = tokenizer, engine, "ready"
            logger.info(
                "ready: %s with %d adapters, on %s", self.base_id, len(engine.adapters()), engine.description
            )
        except Exception as err:
            logger.exception("loading failed")
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"

    def ready_engine(self) -> Any:
        if self.state == "ready" and self.engine is not None and self.engine.alive:
            return self.engine
        if self.state == "loading":
            raise Unavailable("the model is still loading; retry shortly.")
        raise Unavailable(f"the model worker is not running ({self.error or self.state}).")


def _build_engine(server: _Server, model: Any, tokenizer: Any) -> Any:
    """The configured engine over `model` (see `ServeConfig.engine`)."""
    config = server.config
    common = {
        "base_id": server.base_id,
        "metrics": server.metrics,
        "adapters_dirs": [Path(d) for d in config.adapters_dirs],
        "allow_base_mismatch": config.allow_base_mismatch,
    }
    if config.engine == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(model, tokenizer, server.scheduler, settings=config.vllm, **common)
    from .engine import Engine

    return Engine(
        model,
        tokenizer,
        server.scheduler,
        prompt_cache_mb=config.prompt_cache_mb,
        packed=config.packed,
        prefill_tokens=config.prefill_tokens,
        **common,
    )


def _default_loader(config: ServeConfig) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:
        from ..base_models import load_model
        from ..config import PromptTuningConfig
        from ..devices import resolve_device, resolve_dtype
        from ..model import SoftPromptModel
        from .engine import PLACEHOLDER

        if config.engine == "vllm":  # the front: the tokenizer and the input embeddings only
            from .vllm_engine import embeddings_only_model

            dtype = resolve_dtype("float32" if config.dtype == "auto" else config.dtype, torch_cpu())
            base, tokenizer = embeddings_only_model(config.model, dtype)
        else:
            device = resolve_device(config.device)
            base, tokenizer = load_model(
                config.model, dtype=resolve_dtype(config.dtype, device), device=device
            )
        model = SoftPromptModel(
            base,
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1),
            PLACEHOLDER,
            trainable=False,
        )
        return model.eval(), tokenizer

    return load


def torch_cpu() -> Any:
    import torch

    return torch.device("cpu")


# ---------------------------------------------------------------------- errors and parsing
def _error(err: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(int(err.retry_after))} if isinstance(err, Overloaded) else None
    return JSONResponse(error_body(err.message, err.type, err.param, err.code), err.status, headers=headers)


class _Forbidden(ServeError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class _Unauthorized(ServeError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class _TooLarge(ServeError):
    status = 413
    code = "body_too_large"


def _reject_constant(value: str) -> Any:
    raise ValueError(f"{value} is not a valid JSON number")


async def _parse(request: Request, schema: type[BaseModel], limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge(f"the request body is {length} bytes; at most {limit} are accepted.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLarge(f"the request body is over {limit} bytes.")
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


def _check_key(server: _Server, request: Request) -> None:
    key = server.config.api_key
    if not key:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), key.encode("utf-8")):
        raise _Unauthorized("a valid API key is required (Authorization: Bearer <key>).")


# ---------------------------------------------------------------------- shared by the routes
def _server(request: Request) -> _Server:
    return request.app.state.server


async def _run_job(server: _Server, fn: Callable[[], Any]) -> Any:
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


async def _resolve_model(server: _Server, name: str) -> str | None:
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

        await _run_job(server, load)
        return name
    raise NotFound(f"the model {name!r} does not exist; GET /v1/models lists the served ones.", param="model")


def _allowed_path(server: _Server, path: str) -> Path:
    """`path` resolved, if it lies under a folder this server may load adapters from."""
    target = Path(path).expanduser().resolve()
    for root in server.roots:
        if target == root or root in target.parents:
            return target
    raise _Forbidden(
        f"{path!r} is not under a folder this server may load from "
        f"({', '.join(map(str, server.roots)) or 'none: start with --adapters or --adapter-root'}).",
        param="path",
    )


async def _checked_body(request: Request, schema: type[_Body], update: bool = False) -> tuple[_Server, _Body]:
    """The route's `_Server` and its request body as `schema`, once the API key is checked
    (and, for an `update` of the server's adapters, that updates are allowed)."""
    server = _server(request)
    _check_key(server, request)
    if update:
        _check_updates_allowed(server)
    return server, await _parse(request, schema, server.config.max_body_bytes)


def _check_updates_allowed(server: _Server) -> None:
    if not server.config.allow_adapter_updates:
        raise _Forbidden("adapter updates are off; start the server with --allow-adapter-updates.")


# ---------------------------------------------------------------------- generation requests
def _encode_prompt(server: _Server, prompt: Any) -> list[int]:
    """Token ids of a prompt given as text or as ids (checked against the vocabulary)."""
    if isinstance(prompt, str):
        ids = server.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    else:
        ids = list(prompt)
        vocab = len(server.tokenizer)
        if any(i < 0 or i >= vocab for i in ids):
            raise ServeError(f"prompt token ids must lie in [0, {vocab}).", param="prompt")
    if not ids:
        raise ServeError("the prompt is empty.", param="prompt")
    return ids


MARKER = "{prompt}"


def _encode_marked(server: _Server, adapter: str, prompt: Any) -> tuple[list[int], int]:
    """A completion prompt for an adapter placed at a ``{prompt}`` marker: the text before and
    the text after the marker tokenized separately (as `softprompt.compose.tokenize_template`
    does), and the index of the first token after it."""
    if not isinstance(prompt, str) or prompt.count(MARKER) != 1:
        raise ServeError(
            f"adapter {adapter!r} is placed at a {MARKER} marker: write {MARKER} once in the prompt text, "
            f"where the soft prompt goes (e.g. 'Review: great film\\n{MARKER}Sentiment:').",
            param="prompt",
        )
    left, right = prompt.split(MARKER)
    ids = [server.tokenizer(t, add_special_tokens=False)["input_ids"] if t else [] for t in (left, right)]
    if not ids[0] and not ids[1]:
        raise ServeError("the prompt is empty.", param="prompt")
    return list(ids[0]) + list(ids[1]), len(ids[0])


def _plan_requests(
    server: _Server,
    body: CompletionRequest | ChatCompletionRequest,
    adapter: str | None,
    prompts: list[list[int]],
    default_max: int | None,
    max_tokens: int | None,
    positions: list[int | None] | None = None,
) -> list[GenerationRequest]:
    """One `GenerationRequest` per prompt, its length and sampling checked against the model."""
    engine = server.engine
    room = engine.context_length - engine.prompt_length(adapter)
    longest = max(len(p) for p in prompts)
    if longest >= room:
        raise ServeError(
            f"the prompt is {longest} tokens; this model takes at most {room - 1} with this adapter.",
            param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            code="context_length_exceeded",
        )
    if max_tokens is not None and longest + max_tokens > room:
        raise ServeError(
            f"max_tokens={max_tokens} is too many: the prompt takes {longest} of the model's {room} "
            f"positions (with this adapter), so at most {room - longest} tokens can be generated.",
            param="max_tokens",
            code="context_length_exceeded",
        )
    n = body.n or 1
    if n > server.scheduler.max_batch_size:
        raise ServeError(
            f"n={n} is more than this server's batch size ({server.scheduler.max_batch_size}).", param="n"
        )
    temperature = 1.0 if body.temperature is None else body.temperature
    out = []
    for ids, position in zip(prompts, positions or [None] * len(prompts)):
        limit = max_tokens if max_tokens is not None else min(default_max or room, room - len(ids))
        if isinstance(body, CompletionRequest):
            logprobs = body.logprobs
        else:
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = SamplingParams(
            max_tokens=limit,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stops,
            seed=body.seed,
            logprobs=logprobs,
        )
        out.append(
            GenerationRequest(
                adapter,
                ids,
                params,
                n=n,
                decode=lambda t: server.tokenizer.decode(t, skip_special_tokens=True),
                stop_token_ids=engine.stop_token_ids,
                prompt_position=position,
            )
        )
    return out


async def _generate(
    server: _Server,
    request: Request,
    body: Any,
    reqs: list[GenerationRequest],
    kind: str,
    endpoint: str,
    label: str,
) -> Response:
    """Queue `reqs`, then answer with one JSON body or a stream of server-sent events."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    for i, req in enumerate(reqs):

        def sink(event: Event, i: int = i) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, (i, event))
            except RuntimeError:  # the loop is closed (shutdown)
                pass

        req.sink = sink
    try:
        for req in reqs:
            server.scheduler.submit(req)
    except ServeError:
        for req in reqs:
            server.scheduler.cancel(req)
        raise
    rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
    created = int(time.time())
    if body.stream:
        stream = _stream(server, request, body, reqs, queue, kind, rid, created, endpoint, label)
        return StreamingResponse(
            stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    try:
        open_ = len(reqs)
        while open_:
            try:
                _, event = await asyncio.wait_for(queue.get(), 0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            if event.kind in ("done", "error"):
                open_ -= 1
    finally:
        for req in reqs:
            if not req.done.is_set():
                server.scheduler.cancel(req)
    for req in reqs:
        if req.error is not None:
            server.metrics.request(endpoint, label, req.error.status)
            raise req.error
    server.metrics.request(endpoint, label, 200)
    return JSONResponse(_final(server, body, reqs, kind, rid, created).model_dump())


# ---------------------------------------------------------------------- routes
async def _health(request: Request) -> Response:
    try:
        _server(request).ready_engine()
    except ServeError as err:
        return _error(err)
    return JSONResponse({"status": "ok"})


async def _metrics(request: Request) -> Response:
    from .metrics import CONTENT_TYPE

    server = _server(request)
    server.metrics.queue.set(server.scheduler.queue_depth)
    if server.engine is not None:
        server.engine.observe(server.metrics)
    return Response(server.metrics.render(), media_type=CONTENT_TYPE)


async def _models(request: Request) -> Response:
    from .adapters import scan_adapters

    server = _server(request)
    _check_key(server, request)
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


async def _completions(request: Request) -> Response:
    server, body = await _checked_body(request, CompletionRequest)
    adapter = await _resolve_model(server, body.model)
    server.ready_engine()
    p = body.prompt
    raw = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
    if not raw:
        raise ServeError("the prompt is empty.", param="prompt")
    if len(raw) * (body.n or 1) > server.scheduler.max_batch_size * 4:
        raise ServeError("too many prompts in one request.", param="prompt")
    positions: list[int | None] | None = None
    if adapter is not None and server.engine.placed_at_marker(adapter):
        marked = await asyncio.to_thread(lambda: [_encode_marked(server, adapter, x) for x in raw])
        prompts, positions = [m[0] for m in marked], [m[1] for m in marked]
    else:
        prompts = await asyncio.to_thread(lambda: [_encode_prompt(server, x) for x in raw])
    reqs = _plan_requests(server, body, adapter, prompts, 16, body.max_tokens, positions)
    return await _generate(server, request, body, reqs, "completion", "completions", body.model)


async def _chat(request: Request) -> Response:
    server, body = await _checked_body(request, ChatCompletionRequest)
    adapter = await _resolve_model(server, body.model)
    server.ready_engine()
    if adapter is not None and server.engine.placed_at_marker(adapter):
        raise ServeError(
            f"adapter {body.model!r} is placed at a {MARKER} marker inside its input; chat has no place "
            f"for it: use /v1/completions with {MARKER} in the prompt.",
            param="model",
        )
    tokenizer = server.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ServeError(f"{server.base_id} has no chat template; use /v1/completions.", param="messages")
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]

    def render() -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001  (templates raise anything)
            raise ServeError(f"the chat template refused these messages: {err}", param="messages") from None
        return _encode_prompt(server, text)

    ids = await asyncio.to_thread(render)
    max_tokens = body.max_completion_tokens or body.max_tokens
    reqs = _plan_requests(server, body, adapter, [ids], None, max_tokens)
    return await _generate(server, request, body, reqs, "chat", "chat_completions", body.model)


async def _classify(request: Request) -> Response:
    server, body = await _checked_body(request, ClassifyRequest)
    adapter = await _resolve_model(server, body.model)
    if adapter is None:
        raise ServeError(
            "classify needs an adapter trained for classification, not the base model.", param="model"
        )
    engine = server.engine
    texts = body.texts
    results = await _run_job(server, lambda: engine.classify(adapter, texts, body.max_length))
    server.metrics.request("classify", body.model, 200)
    data = [
        {"index": i, "label": r["label"], "probs": r["probs"], "text": t}
        for i, (t, r) in enumerate(zip(texts, results))
    ]
    return JSONResponse({"object": "list", "model": body.model, "data": data})


async def _load_adapter(request: Request) -> Response:
    server, body = await _checked_body(request, LoadAdapterRequest, update=True)
    engine = server.ready_engine()
    path = _allowed_path(server, body.path)
    await _run_job(server, lambda: engine.load_adapter_now(body.name, path))
    return JSONResponse({"status": "ok", "name": body.name, "path": str(path)})


async def _unload_adapter(request: Request) -> Response:
    server, body = await _checked_body(request, UnloadAdapterRequest, update=True)
    engine = server.ready_engine()
    await _run_job(server, lambda: engine.unload_adapter_now(body.name))
    return JSONResponse({"status": "ok", "name": body.name})


ROUTES: list[tuple[str, str, Callable[[Request], Any]]] = [
    ("GET", "/health", _health),
    ("GET", "/metrics", _metrics),
    ("GET", "/v1/models", _models),
    ("POST", "/v1/completions", _completions),
    ("POST", "/v1/chat/completions", _chat),
    ("POST", "/v1/classify", _classify),
    ("POST", "/v1/load_adapter", _load_adapter),
    ("POST", "/v1/unload_adapter", _unload_adapter),
]
"""Every route: method, path, handler (each handler finds the `_Server` on `app.state`)."""


# ---------------------------------------------------------------------- the app
async def _on_serve_error(request: Request, err: ServeError) -> JSONResponse:
    return _error(err)


async def _on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(err.detail), kind, None, None), err.status_code)


async def _on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    return JSONResponse(error_body(f"internal error: {err}", "server_error", None, "internal_error"), 500)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the model in the background (/health answers 503 meanwhile); drain at shutdown."""
    server: _Server = app.state.server
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
    app.state.server = _Server(config, loader)
    # Every error leaves as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}.
    app.add_exception_handler(ServeError, _on_serve_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)
    for method, path, handler in ROUTES:
        app.add_api_route(path, handler, methods=[method])
    return app


# ---------------------------------------------------------------------- response building
def _token_text(server: _Server, token: int) -> str:
    return server.tokenizer.decode([token])


def _usage(reqs: list[GenerationRequest]) -> Usage:
    prompt = sum(len(r.prompt_ids) for r in reqs)
    completion = sum(len(c.tokens) for r in reqs for c in r.choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class _LogprobLog:
    """Per-choice logprob records collected from events."""

    def __init__(self) -> None:
        self.items: dict[tuple[int, int], list[Event]] = {}

    def add(self, req_index: int, event: Event) -> None:
        self.items.setdefault((req_index, event.index), []).append(event)


def _completion_logprobs(server: _Server, events: list[Event]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for e in events:
        text = _token_text(server, e.token)
        out.tokens.append(text)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({_token_text(server, t): lp for t, lp in (e.top or [])})
        out.text_offset.append(offset)
        offset += len(e.text)
    return out


def _chat_logprobs(server: _Server, events: list[Event]) -> ChoiceLogprobs:
    content = []
    for e in events:
        text = _token_text(server, e.token)
        tops = [
            TopLogprob(token=(t2 := _token_text(server, t)), logprob=lp, bytes=list(t2.encode()))
            for t, lp in (e.top or [])
        ]
        content.append(
            TokenLogprob(token=text, logprob=e.logprob, bytes=list(text.encode()), top_logprobs=tops)
        )
    return ChoiceLogprobs(content=content)


def _final(
    server: _Server, body: Any, reqs: list[GenerationRequest], kind: str, rid: str, created: int
) -> Any:
    ids = bool(body.return_token_ids)
    if kind == "completion":
        choices = []
        for i, req in enumerate(reqs):
            for c in req.choices:
                lp = None
                if req.params.logprobs is not None:
                    lp = _completion_logprobs(server, c.events)
                choices.append(
                    CompletionChoice(
                        index=i * req.n + c.index,
                        text=c.text,
                        logprobs=lp,
                        finish_reason=c.finish_reason,
                        token_ids=list(c.tokens) if ids else None,
                        prompt_token_ids=list(req.prompt_ids) if ids else None,
                    )
                )
        return Completion(id=rid, created=created, model=body.model, choices=choices, usage=_usage(reqs))
    req = reqs[0]
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=_chat_logprobs(server, c.events) if req.params.logprobs is not None else None,
            finish_reason=c.finish_reason,
            token_ids=list(c.tokens) if ids else None,
        )
        for c in req.choices
    ]
    return ChatCompletion(
        id=rid,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(reqs),
        prompt_token_ids=list(req.prompt_ids) if ids else None,
    )


def _sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _stream(
    server: _Server,
    request: Request,
    body: Any,
    reqs: list[GenerationRequest],
    queue: asyncio.Queue,
    kind: str,
    rid: str,
    created: int,
    endpoint: str,
    label: str,
) -> AsyncIterator[bytes]:
    """Server-sent events: one chunk per token (and per finish), usage if asked, then [DONE]."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    base = {"id": rid, "object": obj, "created": created, "model": body.model}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    ids = bool(body.return_token_ids)
    try:
        if kind == "chat":
            for c in reqs[0].choices:
                first = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                first["finish_reason"] = None
                yield _sse({**base, "choices": [first]})
        open_ = len(reqs)
        while open_:
            i, event = await queue.get()
            req = reqs[i]
            index = i * req.n + event.index
            if event.kind == "token":
                if kind == "completion":
                    choice: dict[str, Any] = {"index": index, "text": event.text, "logprobs": None}
                    if req.params.logprobs is not None:
                        choice["logprobs"] = _completion_logprobs(server, [event]).model_dump()
                    choice["finish_reason"] = None
                else:
                    choice = {"index": index, "delta": {"content": event.text}, "logprobs": None}
                    if req.params.logprobs is not None:
                        choice["logprobs"] = _chat_logprobs(server, [event]).model_dump()
                    choice["finish_reason"] = None
                if ids:
                    choice["token_ids"] = [event.token]
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            elif event.kind == "finish":
                if kind == "completion":
                    choice = {
                        "index": index,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                else:
                    choice = {
                        "index": index,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": event.finish_reason,
                    }
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                yield _sse(chunk)
            elif event.kind == "done":
                open_ -= 1
            elif event.kind == "error":
                err = event.error
                server.metrics.request(endpoint, label, err.status)
                yield _sse(error_body(err.message, err.type, err.param, err.code))
                yield b"data: [DONE]\n\n"
                return
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(reqs).model_dump()})
        server.metrics.request(endpoint, label, 200)
        yield b"data: [DONE]\n\n"
    finally:
        for req in reqs:
            if not req.done.is_set():
                server.scheduler.cancel(req)
