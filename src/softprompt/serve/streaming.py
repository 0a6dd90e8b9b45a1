"""Queued requests to responses: one JSON body, or server-sent events as the engine emits
tokens (`stream_events`), with usage and logprobs in OpenAI's shapes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from softprompt.serve.errors import ServeError
from softprompt.serve.request import Event, GenerationRequest
from softprompt.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
    error_body,
)
from softprompt.serve.server import Server


async def generate(
    server: Server,
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
        stream = stream_events(server, request, body, reqs, queue, kind, rid, created, endpoint, label)
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
    return JSONResponse(final_body(server, body, reqs, kind, rid, created).model_dump())


def token_text(server: Server, token: int) -> str:
    return server.tokenizer.decode([token])


def usage(reqs: list[GenerationRequest]) -> Usage:
    prompt = sum(len(r.prompt_ids) for r in reqs)
    completion = sum(len(c.tokens) for r in reqs for c in r.choices)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def completion_logprobs(server: Server, events: list[Event]) -> CompletionLogprobs:
    out = CompletionLogprobs()
    offset = 0
    for e in events:
        text = token_text(server, e.token)
        out.tokens.append(text)
        out.token_logprobs.append(e.logprob)
        out.top_logprobs.append({token_text(server, t): lp for t, lp in (e.top or [])})
        out.text_offset.append(offset)
        offset += len(e.text)
    return out


def chat_logprobs(server: Server, events: list[Event]) -> ChoiceLogprobs:
    content = []
    for e in events:
        text = token_text(server, e.token)
        tops = [
            TopLogprob(token=(t2 := token_text(server, t)), logprob=lp, bytes=list(t2.encode()))
            for t, lp in (e.top or [])
        ]
        content.append(
            TokenLogprob(token=text, logprob=e.logprob, bytes=list(text.encode()), top_logprobs=tops)
        )
    return ChoiceLogprobs(content=content)


def final_body(
    server: Server, body: Any, reqs: list[GenerationRequest], kind: str, rid: str, created: int
) -> Any:
    ids = bool(body.return_token_ids)
    if kind == "completion":
        choices = []
        for i, req in enumerate(reqs):
            for c in req.choices:
                lp = None
                if req.params.logprobs is not None:
                    lp = completion_logprobs(server, c.events)
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
        return Completion(id=rid, created=created, model=body.model, choices=choices, usage=usage(reqs))
    req = reqs[0]
    choices = [
        ChatChoice(
            index=c.index,
            message=AssistantMessage(content=c.text),
            logprobs=chat_logprobs(server, c.events) if req.params.logprobs is not None else None,
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
        usage=usage(reqs),
        prompt_token_ids=list(req.prompt_ids) if ids else None,
    )


def sse(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream_events(
    server: Server,
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
                yield sse({**base, "choices": [first]})
        open_ = len(reqs)
        while open_:
            i, event = await queue.get()
            req = reqs[i]
            index = i * req.n + event.index
            if event.kind == "token":
                if kind == "completion":
                    choice: dict[str, Any] = {"index": index, "text": event.text, "logprobs": None}
                    if req.params.logprobs is not None:
                        choice["logprobs"] = completion_logprobs(server, [event]).model_dump()
                    choice["finish_reason"] = None
                else:
                    choice = {"index": index, "delta": {"content": event.text}, "logprobs": None}
                    if req.params.logprobs is not None:
                        choice["logprobs"] = chat_logprobs(server, [event]).model_dump()
                    choice["finish_reason"] = None
                if ids:
                    choice["token_ids"] = [event.token]
                chunk = {**base, "choices": [choice]}
                if include_usage:
                    chunk["usage"] = None
                yield sse(chunk)
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
                yield sse(chunk)
            elif event.kind == "done":
                open_ -= 1
            elif event.kind == "error":
                err = event.error
                server.metrics.request(endpoint, label, err.status)
                yield sse(error_body(err.message, err.type, err.param, err.code))
                yield b"data: [DONE]\n\n"
                return
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(reqs).model_dump()})
        server.metrics.request(endpoint, label, 200)
        yield b"data: [DONE]\n\n"
    finally:
        for req in reqs:
            if not req.done.is_set():
                server.scheduler.cancel(req)
