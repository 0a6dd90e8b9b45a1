"""Padded batches: the built-in engine's batcher for a model whose attention cannot be packed
(or `packed=False`).

The requests that join between two decode steps are prefilled together in one forward pass
(their tokens left-padded, each row starting from its own adapter's cached prompt KV,
`SoftPromptModel.prompt_cache_for`), once for all `n` choices of a request; their
keys/values then join the batch cache, every row left-padded to the batch's width, the
padding columns masked out and positions counting the attended columns only, which is what
`softprompt.core.layout` does for a padded batch. Decode steps run the whole batch as the
bare model (a row's prompt is in its KV).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import DynamicCache

from softprompt.core.model import BASE
from softprompt.core.prefix import cache_tensors, make_cache
from softprompt.serve.batching.rows import KV, Batcher, Row, cache_of, marker_at
from softprompt.serve.errors import InternalError, Unavailable
from softprompt.serve.request import GenerationRequest

logger = logging.getLogger(__name__)


class PaddedKV:
    """The rows being decoded and their keys/values, left-padded to a common width."""

    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.kv: KV = []  # per layer (B, heads, width, dim)
        self.width = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[Row], kv: KV) -> None:
        new_width = kv[0][0].shape[2]
        if not self.rows:
            self.rows, self.kv, self.width = list(rows), [(k, v) for k, v in kv], new_width
            return
        width = max(self.width, new_width)
        merged = []
        for (k0, v0), (k1, v1) in zip(self.kv, kv):
            merged.append(
                (
                    torch.cat([_left_pad(k0, width), _left_pad(k1, width)]),
                    torch.cat([_left_pad(v0, width), _left_pad(v1, width)]),
                )
            )
        self.rows += rows
        self.kv, self.width = merged, width

    def keep(self, keep: list[int]) -> None:
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.kv, self.width = [], [], 0
            return
        self.rows = [self.rows[i] for i in keep]
        width = max(r.length for r in self.rows)
        index = torch.tensor(keep, device=self.kv[0][0].device)
        start = self.width - width
        self.kv = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:])
            for k, v in self.kv
        ]
        self.width = width


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    extra = width - t.shape[2]
    if extra == 0:
        return t
    return torch.cat([t.new_zeros(t.shape[0], t.shape[1], extra, t.shape[3]), t], dim=2)


class PaddedBatcher(Batcher):
    """Prefill the joining requests together, decode every row in one left-padded batch."""

    packed = False

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.batch = PaddedKV()

    @property
    def rows(self) -> list[Row]:  # type: ignore[override]
        return self.batch.rows

    def clear(self) -> None:
        self.batch = PaddedKV()

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def join(self, reqs: list[GenerationRequest]) -> None:
        """Prefill the requests that join now in one forward pass where they can share one.

        Requests whose prompt is a cached prefix (or that have none) are prefilled together:
        their tokens left-padded, each row's prompt KV right-aligned in front of them
        (`prompt_cache_for` with a name per row), so a row gives the numbers it gives alone.
        Others (a prompt at a marker, a model without the prompt cache) and any request of a
        batch whose forward fails are prefilled alone (`_join_one`), so only a bad request fails.
        """
        self.compute_missing_prompts(reqs)
        shared: list[tuple[GenerationRequest, str | None]] = []
        for req in reqs:
            if req.cancelled.is_set() or req.done.is_set():
                continue
            try:
                internal = self.internal(req.adapter)
                if internal is not None and not self.model.uses_prompt_cache([internal], 1, marker_at(req)):
                    self._join_one(req)
                    continue
            except Exception:  # noqa: BLE001  (_join_one fails it with its own message)
                self._join_one(req)
                continue
            shared.append((req, internal))
        if len(shared) == 1:
            self._join_one(shared[0][0])
        elif shared:
            try:
                prefilled = self._prefill_together(shared)
            except Exception:  # prefilled alone: only the request at fault fails
                logger.debug("batched prefill failed; prefilling alone", exc_info=True)
                for req, _ in shared:
                    self._join_one(req)
                return
            self._add_together(shared, *prefilled)

    @torch.no_grad()
    def _join_one(self, req: GenerationRequest) -> None:
        """Prefill `req` (once for its n choices) and add its rows to the batch."""
        if req.cancelled.is_set() or req.done.is_set():
            return
        try:
            kv, length, logits = self.prefill_alone(req, self.internal(req.adapter))
            if req.n > 1:
                kv = [(k.expand(req.n, -1, -1, -1), v.expand(req.n, -1, -1, -1)) for k, v in kv]
            rows, keep = self.first_tokens(req, logits.expand(req.n, -1), length)
        except Exception as err:  # noqa: BLE001  (only this request fails: fail_one logs it)
            self.fail_one(req, err, "at prefill")
            return
        if keep:
            index = torch.tensor(keep, device=kv[0][0].device)
            kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
            self.batch.add([rows[i] for i in keep], kv)
        self.finished(req)

    def _prefill_together(self, shared: list[tuple[GenerationRequest, str | None]]) -> tuple[Any, ...]:
        """One forward pass over the requests' tokens; the cache, each row's attended
        columns right-aligned (`order`, `attended`), each row's length, and the logits."""
        model = self.model
        device = model.device
        names = [internal for _, internal in shared]  # None: no prompt
        lengths = [len(req.prompt_ids) for req, _ in shared]
        width = max(lengths)
        ids = torch.zeros(len(shared), width, dtype=torch.long)
        user_mask = torch.zeros(len(shared), width, dtype=torch.long)
        for i, (req, _) in enumerate(shared):
            ids[i, width - lengths[i] :] = torch.tensor(req.prompt_ids, dtype=torch.long)
            user_mask[i, width - lengths[i] :] = 1
        ids, user_mask = ids.to(device), user_mask.to(device)
        prompt_lengths = [model.prompt_length(n) for n in names]
        prompt_width = max(prompt_lengths)
        if prompt_width:
            cache, _ = model.prompt_cache_for(names, self.dtype)
        else:
            cache = DynamicCache(config=model.base_model.config)
        out = model(
            input_ids=ids,
            attention_mask=user_mask,
            adapter_names=[n if n is not None else BASE for n in names],
            cache=cache,
            use_cache=True,
        )
        kv = cache_tensors(cache_of(out))
        # Each row's attended columns (its prompt, then its tokens), right-aligned: a stable
        # sort of the mask puts a row's padding first and keeps its attended columns in order.
        columns = torch.arange(prompt_width, device=device).unsqueeze(0)
        starts = torch.tensor([prompt_width - n for n in prompt_lengths], device=device).unsqueeze(1)
        mask = torch.cat([(columns >= starts).long(), user_mask], dim=1)
        totals = [p + n for p, n in zip(prompt_lengths, lengths)]
        full = max(totals)
        attended, order = torch.sort(mask, dim=1, stable=True)
        return kv, order[:, -full:], attended[:, -full:], totals, out.logits[:, -1].float()

    def _add_together(
        self,
        shared: list[tuple[GenerationRequest, str | None]],
        kv: KV,
        order: torch.Tensor,
        attended: torch.Tensor,
        totals: list[int],
        logits: torch.Tensor,
    ) -> None:
        """Sample every request's first tokens; its rows that go on join the batch."""
        rows: list[Row] = []
        source: list[int] = []
        for i, (req, _) in enumerate(shared):
            try:
                choices, keep = self.first_tokens(req, logits[i : i + 1].expand(req.n, -1), totals[i])
            except Exception as err:  # noqa: BLE001  (only this request fails: fail_one logs it)
                self.fail_one(req, err, "at prefill")
                continue
            for j in keep:
                rows.append(choices[j])
                source.append(i)
            self.finished(req)
        if not rows:
            return
        index = torch.tensor(source, device=order.device)
        gather = order.index_select(0, index)
        zero = (attended.index_select(0, index) == 0)[:, None, :, None]
        new_kv = []
        for k, v in kv:
            at = gather[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            k = k.index_select(0, index).gather(2, at).masked_fill(zero, 0.0)
            v = v.index_select(0, index).gather(2, at).masked_fill(zero, 0.0)
            new_kv.append((k, v))
        self.batch.add(rows, new_kv)

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def step(self) -> int:
        """One decode step for every row, then drop the rows that are done."""
        batch = self.batch
        self.drop_done()
        if not batch:
            return 0
        t0 = time.perf_counter()
        device = batch.kv[0][0].device
        rows = batch.rows
        ids = torch.tensor([[r.next_token] for r in rows], dtype=torch.long, device=device)
        lengths = torch.tensor([r.length for r in rows], device=device)
        columns = torch.arange(batch.width + 1, device=device).unsqueeze(0)
        mask = (columns >= (batch.width - lengths).unsqueeze(1)).long()  # the new column is attended
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[BASE] * len(rows),
                cache=make_cache(self.model.base_model, batch.kv),
                use_cache=True,
            )
        except Exception as err:  # the batch's forward failed: no row can be blamed, all fail
            logger.exception("decode step failed")
            for req in {id(r.request): r.request for r in rows}.values():
                req.fail(InternalError(f"generation failed: {err}"))
                self.finished(req)
            self.clear()
            return 0
        batch.kv = cache_tensors(cache_of(out))
        batch.width += 1
        for r in rows:
            r.length += 1
        self.sample(rows, out.logits[:, -1].float())
        stepped = len(rows)
        self.seconds = time.perf_counter() - t0
        self.drop_done()
        return stepped

    def drop_done(self) -> None:
        keep = []
        for i, r in enumerate(self.batch.rows):
            req = r.request
            if req.cancelled.is_set() and not req.done.is_set():
                req.fail(Unavailable("cancelled: the client disconnected."))
                self.finished(req)
            if not r.choice.finished and not req.done.is_set():
                keep.append(i)
        self.batch.keep(keep)
