"""`POST /v1/completions` and `POST /v1/chat/completions`."""

from __future__ import annotations

import asyncio

from fastapi import Request
from fastapi.responses import Response

from softprompt.serve.errors import ServeError
from softprompt.serve.http import checked_body, resolve_model
from softprompt.serve.planning import MARKER, encode_marked, encode_prompt, plan_requests
from softprompt.serve.schemas import ChatCompletionRequest, CompletionRequest
from softprompt.serve.streaming import generate


async def completions(request: Request) -> Response:
    server, body = await checked_body(request, CompletionRequest)
    adapter = await resolve_model(server, body.model)
    server.ready_engine()
    p = body.prompt
    raw = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
    if not raw:
        raise ServeError("the prompt is empty.", param="prompt")
    if len(raw) * (body.n or 1) > server.scheduler.max_batch_size * 4:
        raise ServeError("too many prompts in one request.", param="prompt")
    positions: list[int | None] | None = None
    if adapter is not None and server.engine.placed_at_marker(adapter):
        marked = await asyncio.to_thread(lambda: [encode_marked(server, adapter, x) for x in raw])
        prompts, positions = [m[0] for m in marked], [m[1] for m in marked]
    else:
        prompts = await asyncio.to_thread(lambda: [encode_prompt(server, x) for x in raw])
    reqs = plan_requests(server, body, adapter, prompts, 16, body.max_tokens, positions)
    return await generate(server, request, body, reqs, "completion", "completions", body.model)


async def chat(request: Request) -> Response:
    server, body = await checked_body(request, ChatCompletionRequest)
    adapter = await resolve_model(server, body.model)
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
        return encode_prompt(server, text)

    ids = await asyncio.to_thread(render)
    max_tokens = body.max_completion_tokens or body.max_tokens
    reqs = plan_requests(server, body, adapter, [ids], None, max_tokens)
    return await generate(server, request, body, reqs, "chat", "chat_completions", body.model)


ROUTES = [
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat),
]
