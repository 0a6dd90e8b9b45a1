"""From a completion or chat body to `GenerationRequest`s: the prompt's token ids (text,
ids, or text with a `{prompt}` marker for an adapter placed inside its input) and the
sampling, each checked against the model's context length and the server's batch size."""

from __future__ import annotations

from typing import Any

from softprompt.serve.errors import ServeError
from softprompt.serve.request import GenerationRequest, SamplingParams
from softprompt.serve.schemas import ChatCompletionRequest, CompletionRequest
from softprompt.serve.server import Server


def encode_prompt(server: Server, prompt: Any) -> list[int]:
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


def encode_marked(server: Server, adapter: str, prompt: Any) -> tuple[list[int], int]:
    """A completion prompt for an adapter placed at a ``{prompt}`` marker: the text before and
    the text after the marker tokenized separately (as `softprompt.scoring.compose.tokenize_template`
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


def plan_requests(
    server: Server,
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
