"""Units of work shared by the HTTP layer, the scheduler and the engine (no tensors, no HTTP).

A `GenerationRequest` is one completion call: token ids in, `n` choices out. The engine
pushes each new token into a `Choice`, which turns tokens into text, watches for stop
strings and says when the choice is finished. Everything a client sees is delivered as
`Event`s through the request's `sink`, which the HTTP layer sets to something
thread-safe (the engine runs on its own thread).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from softprompt.serve.errors import InternalError, ServeError

_ids = itertools.count(1)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class Event:
    """Something for the client: `kind` is "token", "finish", "done" or "error"."""

    kind: str
    index: int = 0
    text: str = ""
    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None
    error: ServeError | None = None


class Choice:
    """One generated sequence: its tokens, its text and whether it is finished."""

    def __init__(self, index: int, request: GenerationRequest) -> None:
        self.index = index
        self.request = request
        self.tokens: list[int] = []
        self.text = ""  # text so far, cut at a stop string once one appears
        self.sent = 0  # characters of `text` already delivered
        self.finish_reason: str | None = None
        self.events: list[Event] = []  # token events, kept when logprobs are asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> bool:
        """Take one generated token; deliver the new text; True when the choice is finished."""
        req = self.request
        self.tokens.append(token)
        if token in req.stop_token_ids:
            reason = "stop"
            text = self.text
        else:
            text = req.decode(self.tokens)
            reason = None
            for s in req.params.stop:
                at = text.find(s, max(0, self.sent - len(s)))
                if at >= 0:
                    text, reason = text[:at], "stop"
            if reason is None and len(self.tokens) >= req.params.max_tokens:
                reason = "length"
        self.text = text
        if reason is None:
            safe = _stream_safe(text, req.params.stop)
        else:
            safe = len(text)
        delta = text[self.sent : max(safe, self.sent)]
        self.sent = max(safe, self.sent)
        event = Event("token", self.index, delta, token, logprob, top)
        if req.params.logprobs is not None:
            self.events.append(event)
        req.emit(event)
        if reason is not None:
            self.finish(reason)
            return True
        return False

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason
            self.request.emit(Event("finish", self.index, finish_reason=reason))
            self.request.choice_done()


def _stream_safe(text: str, stops: tuple[str, ...]) -> int:
    """How much of `text` can be sent: not a trailing incomplete character, nor the start of a stop."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[:end].endswith(s[:k]):
                end = min(end, len(text[:end]) - k)
                break
    return end


@dataclass
class GenerationRequest:
    """One completion: `n` choices from the same prompt through one adapter (None: bare model)."""

    adapter: str | None  # the served name
    prompt_ids: list[int]
    params: SamplingParams
    n: int = 1
    decode: Callable[[list[int]], str] = field(default=lambda ids: "", repr=False)
    stop_token_ids: frozenset[int] = frozenset()
    sink: Callable[[Event], None] | None = field(default=None, repr=False)
    prompt_position: int | None = None  # a marker adapter's: its prompt goes before prompt_ids[i]
    id: int = field(default_factory=lambda: next(_ids))
    created: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.choices = [Choice(i, self) for i in range(self.n)]
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.error: ServeError | None = None
        self._lock = threading.Lock()
        self._open = self.n
        self.generated = 0

    @property
    def rows(self) -> int:
        return self.n

    def emit(self, event: Event) -> None:
        if event.kind == "token":
            self.generated += 1
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
        if self.sink is not None:
            self.sink(event)

    def choice_done(self) -> None:
        with self._lock:
            self._open -= 1
            last = self._open == 0
        if last:
            self._complete()

    def _complete(self) -> None:
        if not self.done.is_set():
            self.finished_at = time.monotonic()
            self.done.set()
            self.emit(Event("done"))

    def fail(self, error: BaseException) -> None:
        """End the request with an error (once); choices not finished are abandoned."""
        with self._lock:
            if self.done.is_set():
                return
            self._open = 0
        err = error if isinstance(error, ServeError) else InternalError(f"generation failed: {error}")
        self.error = err
        self.finished_at = time.monotonic()
        self.done.set()
        self.emit(Event("error", error=err))

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Job:
    """Work other than generation for the model thread (classify, adapter updates)."""

    run: Callable[[], Any]
    result: Any = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    on_done: Callable[[Job], None] | None = None

    def execute(self) -> None:
        try:
            self.result = self.run()
        except BaseException as err:  # noqa: BLE001  (delivered to the caller)
            self.error = err
        self.done.set()
        if self.on_done is not None:
            self.on_done(self)
