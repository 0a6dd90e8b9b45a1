"""Packed steps: the built-in engine's default batcher (see `softprompt.serve.packed` for
the slots, the step layout and the packed forward).

Every step is one forward over the decoding rows' next tokens and, within `prefill_tokens`,
the prompt tokens of rows still prefilling, packed into one sequence; each row's
keys/values live in a preallocated slot that starts with its adapter's cached prompt KV. A
joining request costs no extra forward pass. `PackedBatcher.probe` checks at start-up that
a model's attention can be packed (else the engine takes the padded batcher).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from softprompt.core import introspect
from softprompt.core.prefix import cache_tensors
from softprompt.serve import packed as kernel
from softprompt.serve.batching.rows import KV, Batcher, Row, cache_of, index, marker_at
from softprompt.serve.errors import InternalError, ServeError, Unavailable
from softprompt.serve.request import GenerationRequest

logger = logging.getLogger(__name__)

IDLE_SLOTS_BYTES = 256 * 2**20  # KV slots kept through an idle spell at most


class PackedBatcher(Batcher):
    """Prefill chunks and decode tokens of all rows in one forward, no padding; row `i`
    owns slot `i` of `slots`.

    Args:
        kv_shape: `(layers, kv_heads, head_dim)` of the model's cache (from `probe`).
        prefill_tokens: Prompt tokens prefilled per step at most (the rest in the next
            steps), so a burst of long prompts does not stall decoding.

    The other arguments are `Batcher`'s.
    """

    packed = True

    def __init__(
        self, *args: Any, kv_shape: tuple[int, int, int], prefill_tokens: int = 256, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.kv_shape = kv_shape
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.rows: list[Row] = []
        self.slots: Any = None
        self.cache_key = introspect.cache_kwarg(self.model.base_model)

    @staticmethod
    @torch.no_grad()
    def probe(model: Any, dtype: torch.dtype) -> tuple[int, int, int] | None:
        """The cache's `(layers, kv_heads, head_dim)` if packed steps give this base model's
        numbers, else None: a 3-token prompt prefilled in two packed steps next to a plain
        forward (an architecture whose attention does not go through transformers'
        attention interface fails it or raises)."""

        base = model.base_model
        device = model.device
        vocab = base.get_input_embeddings().weight.shape[0]
        ids = torch.arange(1, 4, device=device) % vocab
        try:
            out = base(input_ids=ids[None], use_cache=True)
            kv = cache_tensors(cache_of(out))
            shape = (len(kv), kv[0][0].shape[1], kv[0][0].shape[3])
            slots = kernel.KVSlots(*shape, dtype, device)
            slots.reserve(2, 8)
            first = kernel.StepLayout.build([0, 0], [2, 1], device)
            key = introspect.cache_kwarg(base)
            two = torch.cat([ids[:2], ids[:1]])
            logits = kernel.packed_forward(base, key, two, first, slots, index([1, 2], device))
            second = kernel.StepLayout.build([2, 1], [1, 0], device)
            last = kernel.packed_forward(base, key, ids[2:], second, slots, index([0], device))
        except Exception:  # the padded batcher serves it
            logger.info("packed steps unavailable for %s; padded batches", type(base).__name__, exc_info=True)
            return None
        ref = out.logits[0].float()
        got = torch.cat([logits[:1], last, logits[1:]]).float()
        want = torch.stack([ref[1], ref[2], ref[0]])
        close = torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-4)
        return shape if close else None

    def clear(self) -> None:
        self.rows = []
        self.slots = None  # made anew by the next join

    def when_idle(self) -> None:
        """Give back KV slots grown past `IDLE_SLOTS_BYTES` (a burst of long rows) rather
        than hold them until the next burst; smaller ones are kept, so steady traffic does
        not reallocate them after every lull."""
        if self.slots is not None and self.slots.nbytes > IDLE_SLOTS_BYTES:
            logger.debug("idle: releasing %.0f MB of KV slots", self.slots.nbytes / 2**20)
            self.slots = None

    # ------------------------------------------------------------------ joining
    @torch.no_grad()
    def join(self, reqs: list[GenerationRequest]) -> None:
        """Give each joining request a slot holding its adapter's prompt KV; its tokens are
        prefilled by the next steps. A prompt that is not a cached prefix (a marker
        placement) is prefilled alone through the model, then decodes packed."""

        if self.slots is None:
            self.slots = kernel.KVSlots(*self.kv_shape, self.dtype, self.model.device)
        self.compute_missing_prompts(reqs)
        model = self.model
        vocab = model.base_model.get_input_embeddings().weight.shape[0]
        for req in reqs:
            if req.cancelled.is_set() or req.done.is_set():
                continue
            try:
                internal = self.internal(req.adapter)
                if internal is not None and not model.uses_prompt_cache([internal], 1, marker_at(req)):
                    kv, length, logits = self.prefill_alone(req, internal)
                    rows, keep = self.first_tokens(req, logits.expand(req.n, -1), length)
                    self.finished(req)
                    for i in keep:
                        self._add(rows[i], kv, length)
                    continue
                bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
                if bad is not None:  # it would fail the whole packed step
                    raise ServeError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}).")
                kv, length = [], 0
                if internal is not None:
                    cache, _ = model.prompt_cache_for([internal], self.dtype)
                    kv = cache_tensors(cache)
                    length = kv[0][0].shape[2]
                row = Row(req, req.choices[0], None, length)
                row.pending = list(req.prompt_ids)
                self._add(row, kv, length)
            except Exception as err:  # noqa: BLE001  (only this request fails: fail_one logs it)
                self.fail_one(req, err, "at prefill")

    def _add(self, row: Row, kv: KV, length: int) -> None:
        slot = len(self.rows)
        self.slots.reserve(slot + 1, length + 1)
        if length:
            self.slots.put(slot, kv, length)
        self.rows.append(row)

    # ------------------------------------------------------------------ steps
    @torch.no_grad()
    def step(self) -> int:
        """One packed forward: every decoding row's next token and, within the prefill
        budget, prompt tokens of the rows still prefilling (first come first served)."""

        self.drop_done()
        rows = self.rows
        if not rows:
            return 0
        t0 = time.perf_counter()
        device = self.model.device
        budget = self.prefill_tokens
        feeds, ids, keep, ends = [], [], [], []
        for i, r in enumerate(rows):
            if r.pending is None:
                tokens = [r.next_token]
            else:
                tokens = r.pending[: max(0, budget)]
                budget -= len(tokens)
            feeds.append(len(tokens))
            ids += tokens
            if tokens and (r.pending is None or len(tokens) == len(r.pending)):
                keep.append(len(ids) - 1)
                ends.append(i)
        layout = kernel.StepLayout.build([r.length for r in rows], feeds, device)
        self.slots.reserve(len(rows), layout.width)
        try:
            base = self.model.base_model
            tokens, keep_at = index(ids, device), index(keep, device)
            logits = kernel.packed_forward(base, self.cache_key, tokens, layout, self.slots, keep_at).float()
        except Exception as err:  # noqa: BLE001  (_step_failed fails who can be blamed)
            self._step_failed(err, feeds)
            return 0
        for r, q in zip(rows, feeds):
            r.length += q
            if r.pending is not None:
                r.pending = r.pending[q:]
        decoding = [k for k, i in enumerate(ends) if rows[i].pending is None]
        if decoding:
            self.sample([rows[ends[k]] for k in decoding], logits[decoding])
        for k, i in enumerate(ends):
            if rows[i].pending is not None:
                self._prefilled(i, logits[k])
        stepped = len(self)
        self.seconds = time.perf_counter() - t0
        self.drop_done()
        return stepped

    def _step_failed(self, err: Exception, feeds: list[int]) -> None:
        """A packed forward raised. The requests prefilled in it fail (the rows that were
        decoding ran before without them); the others step again (their lengths did not
        move, so the columns the failed step wrote are written again). With no prefill in
        it, no row can be blamed: all fail."""
        fed = {id(r.request): r.request for r, q in zip(self.rows, feeds) if q and r.pending is not None}
        blamed = fed or {id(r.request): r.request for r in self.rows}
        logger.error("packed step failed; failing %d request(s)", len(blamed), exc_info=err)
        for req in blamed.values():
            req.fail(InternalError(f"generation failed: {err}"))
            self.finished(req)
        self.drop_done()

    def _prefilled(self, i: int, logits: torch.Tensor) -> None:
        """Row `i` has prefilled its request: a row per choice that goes on (the first takes
        over its slot, the others copy its keys/values), each with its first token."""
        placeholder = self.rows[i]
        req = placeholder.request
        try:
            rows, keep = self.first_tokens(req, logits[None].expand(req.n, -1), placeholder.length)
        except Exception as err:  # noqa: BLE001  (only this request fails: fail_one logs it)
            self.fail_one(req, err, "at prefill")
            rows, keep = [], []
        self.finished(req)
        go_on = [rows[k] for k in keep]
        if not go_on:
            placeholder.choice = None  # dropped by the next drop_done
            placeholder.pending = None
            return
        self.rows[i] = go_on[0]
        for row in go_on[1:]:
            slot = len(self.rows)
            self.slots.reserve(slot + 1, row.length + 1)
            self.slots.copy(i, slot, row.length)
            self.rows.append(row)

    def drop_done(self) -> None:
        drop = []
        for i, r in enumerate(self.rows):
            req = r.request
            if req.cancelled.is_set() and not req.done.is_set():
                req.fail(Unavailable("cancelled: the client disconnected."))
                self.finished(req)
            if req.done.is_set() or r.choice is None or (r.pending is None and r.choice.finished):
                drop.append(i)
        self._remove(drop)

    def _remove(self, drop: list[int]) -> None:
        """Remove rows at `drop`; the last row moves into each freed slot (one copy each)."""
        for i in sorted(drop, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.slots.copy(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()
