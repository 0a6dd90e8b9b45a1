"""What both batchers share: a running row, and the `Batcher` base that samples, prefills a
request alone, and finishes or fails requests.

A `Row` is one choice of a request being decoded (or, in packed steps, a request still
prefilling, standing for its `n` choices). A batcher owns its rows and their keys/values;
the engine (`softprompt.serve.engine`) calls `join` with the requests admitted between two
steps and `step` while there are rows, on its worker thread, and never looks inside.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch
from transformers import DynamicCache

from softprompt.core.model import BASE
from softprompt.core.prefix import cache_tensors
from softprompt.serve.adapters import AdapterRegistry
from softprompt.serve.errors import InternalError, ServeError
from softprompt.serve.request import GenerationRequest

logger = logging.getLogger(__name__)

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (rows, kv_heads, columns, head_dim)


class Row:
    __slots__ = ("choice", "generator", "length", "next_token", "pending", "request")

    def __init__(self, request: GenerationRequest, choice: Any, generator: Any, length: int) -> None:
        self.request = request
        self.choice = choice
        self.generator = generator
        self.length = length  # attended columns in the cache (prompt + user tokens so far)
        self.next_token = -1  # the last sampled token, fed at the next step
        self.pending: list[int] | None = None  # packed steps: prompt tokens still to prefill

    @property
    def weight(self) -> int:
        """Rows of the batch this row stands for (a prefilling request's choices)."""
        return self.request.n if self.pending is not None else 1


class Batcher:
    """How the built-in engine runs its batch (`PackedBatcher`, `PaddedBatcher`).

    Args:
        model: The served `SoftPromptModel` (CAUSAL_LM, plain per-layer KV cache).
        registry: The served adapters (served name -> the model's internal name).
        dtype: The dtype of the model's keys/values.
        metrics: A `softprompt.serve.metrics.Metrics` (or None).
        base_id: The bare model's name, the metrics label of requests without an adapter.
    """

    #: Shown in the log and by `Engine.packed`.
    packed = False

    def __init__(
        self, model: Any, registry: AdapterRegistry, dtype: torch.dtype, metrics: Any, base_id: str
    ) -> None:
        self.model = model
        self.registry = registry
        self.dtype = dtype
        self.metrics = metrics
        self.base_id = base_id
        #: The last step's forward and sampling, in seconds (the drops before and after
        #: not counted): what the scheduler's admission and Retry-After estimate from.
        self.seconds = 0.0

    #: The running rows, in the batcher's order.
    rows: list[Row]

    # ------------------------------------------------------------------ the interface
    def __len__(self) -> int:
        """Rows counted against the batch size (a prefilling request counts its choices)."""
        return sum(r.weight for r in self.rows)

    def join(self, reqs: list[GenerationRequest]) -> None:
        """Add the requests admitted now (a request that cannot join fails alone)."""
        raise NotImplementedError

    def step(self) -> int:
        """One forward for the running rows; the rows it ran (0: none ran, or it failed),
        its time in `seconds`."""
        raise NotImplementedError

    def drop_done(self) -> None:
        """Drop the rows whose request is finished, failed or cancelled."""
        raise NotImplementedError

    def clear(self) -> None:
        """Forget every row and its keys/values."""
        raise NotImplementedError

    def when_idle(self) -> None:
        """Nothing runs: a chance to give back memory kept between bursts."""

    def fail_all(self, error: ServeError) -> None:
        for row in self.rows:
            row.request.fail(error)
        self.clear()

    # ------------------------------------------------------------------ prefill
    def internal(self, name: str | None) -> str | None:
        return self.registry.internal(name)

    def compute_missing_prompts(self, reqs: list[GenerationRequest]) -> None:
        """The prompt KV of the joining requests' adapters that is not in the cache (evicted,
        never used), in one forward pass for all of them instead of one each. On any error
        nothing fails here: each request computes its own as it joins, and fails alone."""
        # an unknown (unloaded) adapter: its join reports it
        prefixed = [
            r for r in reqs if r.adapter is not None and not self.registry.placed_at_marker(r.adapter)
        ]
        names = [self.registry.internal_or_none(r.adapter) for r in prefixed]
        names = [n for n in names if n is not None and self.model.uses_prompt_cache([n], 1)]
        if len(set(names)) > 1:
            try:
                self.model.prompt_kv.compute_missing(self.model, names, self.dtype)
            except Exception:
                logger.debug("computing several prompts' KV at once failed", exc_info=True)

    def prefill_alone(self, req: GenerationRequest, internal: str | None) -> tuple[KV, int, torch.Tensor]:
        """One forward over `req`'s tokens through its adapter: its KV `(1, kv_heads, L, dim)`
        per layer, `L` and the last position's logits `(1, V)`."""
        model = self.model
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=model.device)
        names = [internal if internal is not None else BASE]
        if internal is not None and model.uses_prompt_cache(names, 1, marker_at(req)):
            cache, _ = model.prompt_cache_for([internal], self.dtype)
        else:
            cache = DynamicCache(config=model.base_model.config)
        mask = torch.ones_like(ids)
        extra: dict[str, Any] = {}
        if req.prompt_position is not None:  # every column's logits: the last may be a prompt column
            extra = {"prompt_positions": marker_at(req), "full_sequence": True}
        out = model(
            input_ids=ids, attention_mask=mask, adapter_names=names, cache=cache, use_cache=True, **extra
        )
        kv = cache_tensors(cache_of(out))
        return kv, kv[0][0].shape[2], out.logits[:, -1].float()

    # ------------------------------------------------------------------ tokens
    def generator(self, req: GenerationRequest, index: int) -> torch.Generator | None:
        if req.params.greedy:
            return None
        seed = req.params.seed if req.params.seed is not None else random.randrange(2**62)
        g = torch.Generator(device=self.model.device)
        g.manual_seed(int(seed) + index)
        return g

    def sample(self, rows: list[Row], logits: torch.Tensor) -> list[int]:
        """Pick each row's next token, deliver it; the indices of rows that go on."""
        want = [r.request.params.logprobs for r in rows]
        logp = torch.log_softmax(logits, dim=-1) if any(w is not None for w in want) else None
        greedy = logits.argmax(dim=-1).tolist()
        go_on = []
        for i, r in enumerate(rows):
            req = r.request
            if req.done.is_set():
                continue
            try:
                params = req.params
                token = greedy[i] if params.greedy else sample_one(logits[i], params, r.generator)
                lp, top = None, None
                if logp is not None and params.logprobs is not None:
                    lp = float(logp[i, token])
                    if params.logprobs > 0:
                        values, indices = logp[i].topk(params.logprobs)
                        top = list(zip(indices.tolist(), values.tolist()))
                r.next_token = token
                if not r.choice.add(token, lp, top):
                    go_on.append(i)
                else:
                    self.finished(req)
            except Exception as err:  # noqa: BLE001  (only this request fails: fail_one logs it)
                self.fail_one(req, err, "while sampling")
        return go_on

    def first_tokens(
        self, req: GenerationRequest, logits: torch.Tensor, length: int
    ) -> tuple[list[Row], list[int]]:
        """A row per choice of a prefilled request (`length` tokens in its KV), each row's first
        token sampled from its row of `logits`, and its prompt tokens counted; returns the rows
        and the indices of those that go on."""
        rows = [Row(req, c, self.generator(req, c.index), length) for c in req.choices]
        keep = self.sample(rows, logits)
        if self.metrics is not None:
            self.metrics.prompt_tokens(self.label(req), len(req.prompt_ids))
        return rows, keep

    # ------------------------------------------------------------------ finishing
    def fail_one(self, req: GenerationRequest, err: Exception, when: str) -> None:
        """`req` alone fails (with `err` when it is a `ServeError`, else a 500) and is finished."""
        logger.debug("request %s failed %s", req.id, when, exc_info=err)
        req.fail(err if isinstance(err, ServeError) else InternalError(f"generation failed: {err}"))
        self.finished(req)

    def label(self, req: GenerationRequest) -> str:
        return req.adapter or self.base_id

    def finished(self, req: GenerationRequest) -> None:
        if self.metrics is not None and req.done.is_set() and not getattr(req, "_counted", False):
            req._counted = True
            self.metrics.finished(req, self.label(req))


def marker_at(req: GenerationRequest) -> list[int] | None:
    """`prompt_positions` for a request of an adapter placed at a marker (else None)."""
    return None if req.prompt_position is None else [req.prompt_position]


def index(values: list[int], device: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def sample_one(logits: torch.Tensor, params: Any, generator: torch.Generator | None) -> int:
    """Temperature and nucleus (top_p) sampling of one row."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        drop = cumulative - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
