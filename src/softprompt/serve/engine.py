"""The model worker: one thread that owns the model and runs prefill and decode steps.

Two ways to run the batch, with the same results (each row gives the numbers it gives
alone, checked against `SoftPromptModel.generate` in the tests):

- Packed steps (the default where the model passes a start-up check, see
  `softprompt.serve.packed`): every step is one forward over the decoding rows' next
  tokens and, within `prefill_tokens`, the prompt tokens of rows still prefilling, packed
  into one sequence; each row's keys/values live in a preallocated slot that starts with
  its adapter's cached prompt KV. A joining request costs no extra forward pass.
- Padded batches (`packed=False`, or a model whose attention cannot be packed): the
  requests that join between two decode steps are prefilled together in one forward pass
  (their tokens left-padded, each row starting from its own adapter's cached prompt KV,
  `SoftPromptModel.prompt_cache_for`), once for all `n` choices of a request; their
  keys/values then join the batch cache, every row left-padded to the batch's width, the
  padding columns masked out and positions counting the attended columns only, which is
  what `softprompt.core.layout` does for a padded batch.

After the prefill a row no longer needs its adapter (its prompt is in its KV), so decode
steps run the whole batch as the bare model, whatever adapter each row started with, and
an adapter can be replaced or removed while its requests finish.

Adapters are known by their served name; inside the model each load gets a fresh
internal name, so replacing an adapter is atomic. All model changes happen on the
worker thread (as `Job`s between steps). The engine never sees HTTP.

Keep every torch computation of a served process on this thread (the server loads the
model in a thread that ends before serving starts). Another live thread that has run
torch's parallel CPU ops keeps its own OpenMP thread pool; with more OpenMP threads than
CPUs, GNU OpenMP stops spin-waiting between parallel regions, and on the 2-core test
machine a one-row decode step went from about 50 ms to about 75 ms.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from softprompt.core import introspect
from softprompt.core.model import BASE
from softprompt.core.prefix import PromptKV, cache_tensors, make_cache, supports_prefix_cache
from softprompt.scoring.classify import classify_texts
from softprompt.serve import packed
from softprompt.serve.adapters import (  # noqa: F401  (find_adapter_folder, scan_adapters: re-exported)
    ADAPTER_NAME,
    AdapterMethods,
    AdapterRegistry,
    context_length,
    find_adapter_folder,
    scan_adapters,
    stop_token_ids,
    stop_worker,
)
from softprompt.serve.errors import InternalError, ServeError, Unavailable
from softprompt.serve.request import GenerationRequest
from softprompt.serve.scheduler import Scheduler

logger = logging.getLogger(__name__)

PLACEHOLDER = "_serve_placeholder_"
IDLE_SLOTS_BYTES = 256 * 2**20  # packed KV slots kept through an idle spell at most


# ---------------------------------------------------------------------- the running batch
class _Row:
    __slots__ = ("choice", "generator", "length", "next_token", "pending", "request")

    def __init__(self, request: GenerationRequest, choice: Any, generator: Any, length: int) -> None:
        self.request = request
        self.choice = choice
        self.generator = generator
        self.length = length  # attended columns in the cache (prompt + user tokens so far)
        self.next_token = -1  # the last sampled token, fed at the next step
        self.pending: list[int] | None = None  # packed mode: prompt tokens still to prefill

    @property
    def rows(self) -> int:
        """Rows of the batch this row stands for (a prefilling request's choices)."""
        return self.request.n if self.pending is not None else 1


class _PackedBatch:
    """Packed mode's running rows; row `i` owns slot `i` of `slots` (see `serve.packed`)."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.slots: Any = None

    def __len__(self) -> int:  # rows counted against the batch size, prefilling choices included
        return sum(r.rows for r in self.rows)

    def remove(self, drop: list[int]) -> None:
        """Remove rows at `drop`; the last row moves into each freed slot (one copy each)."""
        for i in sorted(drop, reverse=True):
            last = len(self.rows) - 1
            if i != last:
                self.slots.copy(last, i, self.rows[last].length)
                self.rows[i] = self.rows[last]
            self.rows.pop()


class _Batch:
    """The rows being decoded and their keys/values, left-padded to a common width."""

    def __init__(self) -> None:
        self.rows: list[_Row] = []
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer (B, heads, width, dim)
        self.width = 0

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: list[_Row], kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
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


# ---------------------------------------------------------------------- the engine
class Engine(AdapterMethods):
    """One worker thread running a `SoftPromptModel` for many adapters at once.

    Args:
        model: A CAUSAL_LM `SoftPromptModel` whose base model takes a plain KV cache.
        tokenizer: Its tokenizer.
        scheduler: Where requests and jobs come from.
        base_id: The name clients use for the bare model.
        metrics: A `softprompt.serve.metrics.Metrics` (or None).
        prompt_cache_mb: Memory budget for the prompts' KV (None: unbounded).
        adapters_dirs: Folders searched for adapters requested by name (just in time).
        allow_base_mismatch: Load adapters saved from a different base model of the same
            width (refused by default, see `softprompt.core.adapter_files.base_fingerprint`).
        packed: Run packed steps (`softprompt.serve.packed`: prefill chunks and decode
            tokens of all rows in one forward, no padding); None: where the model passes
            a start-up check, else the padded batch.
        prefill_tokens: Packed mode: prompt tokens prefilled per step at most (the rest
            in the next steps), so a burst of long prompts does not stall decoding.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        scheduler: Scheduler,
        *,
        base_id: str,
        metrics: Any = None,
        prompt_cache_mb: float | None = None,
        adapters_dirs: list[Path] | tuple[Path, ...] = (),
        allow_base_mismatch: bool = False,
        packed: bool | None = None,
        prefill_tokens: int = 256,
    ) -> None:
        if model.task_type.value != "CAUSAL_LM":
            raise ValueError(f"serving needs a CAUSAL_LM model; this one does {model.task_type.value}.")
        if not supports_prefix_cache(model.base_model):
            raise ValueError(
                f"{type(model.base_model).__name__} keeps a KV cache that is not plain per-layer keys and "
                "values (sliding-window, chunked or recurrent layers); the server cannot batch it."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.base_id = base_id
        self.metrics = metrics
        self.adapters_dirs = [Path(d) for d in adapters_dirs]
        self.allow_base_mismatch = allow_base_mismatch
        budget = None if prompt_cache_mb is None else int(prompt_cache_mb * 2**20)
        model.prompt_kv = PromptKV(budget)
        self.dtype = model.base_model.get_input_embeddings().weight.dtype
        self.context_length = context_length(model)
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.registry = AdapterRegistry(model, base_id, adapters_dirs, allow_base_mismatch)
        self.prefill_tokens = max(1, int(prefill_tokens))
        self.packed = self._check_packed() if packed is None else packed
        if packed and not self._check_packed():
            raise ValueError(
                f"{type(model.base_model).__name__} cannot run packed steps (its attention does not go "
                "through transformers' attention interface); start the server without packed=True."
            )
        self._batch: Any = _PackedBatch() if self.packed else _Batch()
        logger.info("decoding in %s", "packed steps" if self.packed else "padded batches")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self.state = "ready"
        self.steps = 0

    # ------------------------------------------------------------------ adapters (AdapterMethods)
    def _internal(self, name: str | None) -> str | None:
        return self.registry.internal(name)

    @property
    def description(self) -> str:
        return f"{self.model.device} in {str(self.dtype).removeprefix('torch.')}"

    def observe(self, metrics: Any) -> None:
        metrics.prompt_cache(self.model.prompt_kv)

    # ------------------------------------------------------------------ classification
    def classify(self, name: str, texts: list[str], max_length: int | None = None) -> list[dict[str, Any]]:
        """Rank classification with the adapter's run template and label words (worker thread)."""

        template, words, max_length_run = self.registry.classification_settings(name)
        return classify_texts(
            self.model,
            self.tokenizer,
            texts,
            adapter=self._internal(name),
            template=template,
            label_words=words,
            max_length=max_length or max_length_run or 256,
        )

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Refuse new work, let running requests finish (up to `drain_seconds`), then stop."""
        stop_worker(self, drain_seconds)

    def _run(self) -> None:
        try:
            while True:
                if self._stop.is_set() and (
                    not self._batch or time.monotonic() > (self._drain_deadline or 0)
                ):
                    break
                for job in self.scheduler.jobs():
                    job.execute()
                if not self._stop.is_set():
                    if not self._batch:
                        self.scheduler.gather_burst()
                    joining = self.scheduler.admit(len(self._batch))
                    if joining:
                        (self._join_packed if self.packed else self._join_all)(joining)
                if self._batch:
                    (self._step_packed if self.packed else self._step)()
                else:
                    self.scheduler.running_rows = 0
                    self._release_idle_slots()
                    if not self._stop.is_set():
                        self.scheduler.wait_for_work(0.1)
        except BaseException:  # a bug: report it, fail what is running, mark the engine dead
            logger.exception("the model worker died")
            self.state = "dead"
            self._fail_all(InternalError("the model worker stopped; see the server log."))
            raise
        finally:
            self._fail_all(Unavailable("the server is shutting down."))
            if self.state != "dead":
                self.state = "stopped"

    def _release_idle_slots(self) -> None:
        """With nothing running, give back KV slots grown past `IDLE_SLOTS_BYTES` (a burst of
        long rows) rather than hold them until the next burst; smaller ones are kept, so
        steady traffic does not reallocate them after every lull."""
        slots = getattr(self._batch, "slots", None)
        if slots is not None and slots.nbytes > IDLE_SLOTS_BYTES:
            logger.debug("idle: releasing %.0f MB of KV slots", slots.nbytes / 2**20)
            self._batch.slots = None

    def _fail_all(self, error: ServeError) -> None:
        for row in self._batch.rows:
            row.request.fail(error)
        self._batch = _PackedBatch() if self.packed else _Batch()

    # ------------------------------------------------------------------ prefill
    @torch.no_grad()
    def _join(self, req: GenerationRequest) -> None:
        """Prefill `req` (once for its n choices) and add its rows to the batch."""
        if req.cancelled.is_set() or req.done.is_set():
            return
        try:
            kv, length, logits = self._prefill_alone(req, self._internal(req.adapter))
            if req.n > 1:
                kv = [(k.expand(req.n, -1, -1, -1), v.expand(req.n, -1, -1, -1)) for k, v in kv]
            rows, keep = self._first_tokens(req, logits.expand(req.n, -1), length)
        except Exception as err:  # noqa: BLE001  (only this request fails: _fail_one logs it)
            self._fail_one(req, err, "at prefill")
            return
        if keep:
            index = torch.tensor(keep, device=kv[0][0].device)
            kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv]
            self._batch.add([rows[i] for i in keep], kv)
        self._finished(req)

    def _compute_missing_prompts(self, reqs: list[GenerationRequest]) -> None:
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

    def _prefill_alone(
        self, req: GenerationRequest, internal: str | None
    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int, torch.Tensor]:
        """One forward over `req`'s tokens through its adapter: its KV `(1, kv_heads, L, dim)`
        per layer, `L` and the last position's logits `(1, V)`."""
        model = self.model
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=model.device)
        names = [internal if internal is not None else BASE]
        if internal is not None and model.uses_prompt_cache(names, 1, _marker_at(req)):
            cache, _ = model.prompt_cache_for([internal], self.dtype)
        else:
            cache = DynamicCache(config=model.base_model.config)
        mask = torch.ones_like(ids)
        extra: dict[str, Any] = {}
        if req.prompt_position is not None:  # every column's logits: the last may be a prompt column
            extra = {"prompt_positions": _marker_at(req), "full_sequence": True}
        out = model(
            input_ids=ids, attention_mask=mask, adapter_names=names, cache=cache, use_cache=True, **extra
        )
        kv = cache_tensors(_cache_of(out))
        return kv, kv[0][0].shape[2], out.logits[:, -1].float()

    @torch.no_grad()
    def _join_all(self, reqs: list[GenerationRequest]) -> None:
        """Prefill the requests that join now in one forward pass where they can share one.

        Requests whose prompt is a cached prefix (or that have none) are prefilled together:
        their tokens left-padded, each row's prompt KV right-aligned in front of them
        (`prompt_cache_for` with a name per row), so a row gives the numbers it gives alone.
        Others (a prompt at a marker, a model without the prompt cache) and any request of a
        batch whose forward fails are prefilled alone (`_join`), so only a bad request fails.
        """
        self._compute_missing_prompts(reqs)
        shared: list[tuple[GenerationRequest, str | None]] = []
        for req in reqs:
            if req.cancelled.is_set() or req.done.is_set():
                continue
            try:
                internal = self._internal(req.adapter)
                if internal is not None and not self.model.uses_prompt_cache([internal], 1, _marker_at(req)):
                    self._join(req)
                    continue
            except Exception:  # noqa: BLE001  (_join fails it with its own message)
                self._join(req)
                continue
            shared.append((req, internal))
        if len(shared) == 1:
            self._join(shared[0][0])
        elif shared:
            try:
                prefilled = self._prefill_together(shared)
            except Exception:  # prefilled alone: only the request at fault fails
                logger.debug("batched prefill failed; prefilling alone", exc_info=True)
                for req, _ in shared:
                    self._join(req)
                return
            self._add_together(shared, *prefilled)

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
        kv = cache_tensors(_cache_of(out))
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
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        order: torch.Tensor,
        attended: torch.Tensor,
        totals: list[int],
        logits: torch.Tensor,
    ) -> None:
        """Sample every request's first tokens; its rows that go on join the batch."""
        rows: list[_Row] = []
        source: list[int] = []
        for i, (req, _) in enumerate(shared):
            try:
                choices, keep = self._first_tokens(req, logits[i : i + 1].expand(req.n, -1), totals[i])
            except Exception as err:  # noqa: BLE001  (only this request fails: _fail_one logs it)
                self._fail_one(req, err, "at prefill")
                continue
            for j in keep:
                rows.append(choices[j])
                source.append(i)
            self._finished(req)
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
        self._batch.add(rows, new_kv)

    # ------------------------------------------------------------------ packed steps
    @torch.no_grad()
    def _check_packed(self) -> bool:
        """Whether packed steps give this base model's numbers: a 3-token prompt prefilled
        in two packed steps next to a plain forward (an architecture whose attention does
        not go through transformers' attention interface fails it or raises)."""

        base = self.model.base_model
        device = self.model.device
        vocab = base.get_input_embeddings().weight.shape[0]
        ids = torch.arange(1, 4, device=device) % vocab
        try:
            out = base(input_ids=ids[None], use_cache=True)
            kv = cache_tensors(_cache_of(out))
            self._kv_shape = (len(kv), kv[0][0].shape[1], kv[0][0].shape[3])
            slots = packed.KVSlots(*self._kv_shape, self.dtype, device)
            slots.reserve(2, 8)
            first = packed.StepLayout.build([0, 0], [2, 1], device)
            key = self._cache_key
            two = torch.cat([ids[:2], ids[:1]])
            logits = packed.packed_forward(base, key, two, first, slots, _idx([1, 2], device))
            second = packed.StepLayout.build([2, 1], [1, 0], device)
            last = packed.packed_forward(base, key, ids[2:], second, slots, _idx([0], device))
        except Exception:  # the padded batch serves it
            logger.info("packed steps unavailable for %s; padded batches", type(base).__name__, exc_info=True)
            return False
        ref = out.logits[0].float()
        got = torch.cat([logits[:1], last, logits[1:]]).float()
        want = torch.stack([ref[1], ref[2], ref[0]])
        return bool(torch.allclose(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()) + 1e-4))

    @property
    def _cache_key(self) -> str:

        return introspect.cache_kwarg(self.model.base_model)

    @torch.no_grad()
    def _join_packed(self, reqs: list[GenerationRequest]) -> None:
        """Give each joining request a slot holding its adapter's prompt KV; its tokens are
        prefilled by the next steps. A prompt that is not a cached prefix (a marker
        placement) is prefilled alone through the model, then decodes packed."""

        batch = self._batch
        if batch.slots is None:
            batch.slots = packed.KVSlots(*self._kv_shape, self.dtype, self.model.device)
        self._compute_missing_prompts(reqs)
        for req in reqs:
            if req.cancelled.is_set() or req.done.is_set():
                continue
            try:
                internal = self._internal(req.adapter)
                model = self.model
                if internal is not None and not model.uses_prompt_cache([internal], 1, _marker_at(req)):
                    kv, length, logits = self._prefill_alone(req, internal)
                    rows, keep = self._first_tokens(req, logits.expand(req.n, -1), length)
                    self._finished(req)
                    for i in keep:
                        self._add_packed(rows[i], kv, length)
                    continue
                vocab = model.base_model.get_input_embeddings().weight.shape[0]
                bad = next((t for t in req.prompt_ids if not 0 <= t < vocab), None)
                if bad is not None:  # it would fail the whole packed step
                    raise ServeError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}).")
                kv, length = [], 0
                if internal is not None:
                    cache, _ = model.prompt_cache_for([internal], self.dtype)
                    kv = cache_tensors(cache)
                    length = kv[0][0].shape[2]
                row = _Row(req, req.choices[0], None, length)
                row.pending = list(req.prompt_ids)
                self._add_packed(row, kv, length)
            except Exception as err:  # noqa: BLE001  (only this request fails: _fail_one logs it)
                self._fail_one(req, err, "at prefill")

    def _add_packed(self, row: _Row, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        batch = self._batch
        slot = len(batch.rows)
        batch.slots.reserve(slot + 1, length + 1)
        if length:
            batch.slots.put(slot, kv, length)
        batch.rows.append(row)

    @torch.no_grad()
    def _step_packed(self) -> None:
        """One packed forward: every decoding row's next token and, within the prefill
        budget, prompt tokens of the rows still prefilling (first come first served)."""

        batch = self._batch
        self._drop_done_packed()
        if not batch.rows:
            return
        t0 = time.perf_counter()
        device = self.model.device
        budget = self.prefill_tokens
        feeds, ids, keep, ends = [], [], [], []
        for i, r in enumerate(batch.rows):
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
        layout = packed.StepLayout.build([r.length for r in batch.rows], feeds, device)
        batch.slots.reserve(len(batch.rows), layout.width)
        try:
            base, slots = self.model.base_model, batch.slots
            tokens, keep_at = _idx(ids, device), _idx(keep, device)
            logits = packed.packed_forward(base, self._cache_key, tokens, layout, slots, keep_at).float()
        except Exception as err:  # noqa: BLE001  (_packed_step_failed fails who can be blamed)
            self._packed_step_failed(err, feeds)
            return
        for r, q in zip(batch.rows, feeds):
            r.length += q
            if r.pending is not None:
                r.pending = r.pending[q:]
        decoding = [k for k, i in enumerate(ends) if batch.rows[i].pending is None]
        if decoding:
            self._sample([batch.rows[ends[k]] for k in decoding], logits[decoding])
        for k, i in enumerate(ends):
            if batch.rows[i].pending is not None:
                self._prefilled(i, logits[k])
        self.steps += 1
        seconds = time.perf_counter() - t0
        self.scheduler.step_seconds = 0.9 * self.scheduler.step_seconds + 0.1 * seconds
        if self.metrics is not None:
            self.metrics.step(len(batch), self.scheduler.queue_depth)
        self._drop_done_packed()

    def _packed_step_failed(self, err: Exception, feeds: list[int]) -> None:
        """A packed forward raised. The requests prefilled in it fail (the rows that were
        decoding ran before without them); the others step again (their lengths did not
        move, so the columns the failed step wrote are written again). With no prefill in
        it, no row can be blamed: all fail."""
        batch = self._batch
        fed = {id(r.request): r.request for r, q in zip(batch.rows, feeds) if q and r.pending is not None}
        blamed = fed or {id(r.request): r.request for r in batch.rows}
        logger.error("packed step failed; failing %d request(s)", len(blamed), exc_info=err)
        for req in blamed.values():
            req.fail(InternalError(f"generation failed: {err}"))
            self._finished(req)
        self._drop_done_packed()

    def _prefilled(self, i: int, logits: torch.Tensor) -> None:
        """Row `i` has prefilled its request: a row per choice that goes on (the first takes
        over its slot, the others copy its keys/values), each with its first token."""
        batch = self._batch
        placeholder = batch.rows[i]
        req = placeholder.request
        try:
            rows, keep = self._first_tokens(req, logits[None].expand(req.n, -1), placeholder.length)
        except Exception as err:  # noqa: BLE001  (only this request fails: _fail_one logs it)
            self._fail_one(req, err, "at prefill")
            rows, keep = [], []
        self._finished(req)
        go_on = [rows[k] for k in keep]
        if not go_on:
            placeholder.choice = None  # dropped by the next _drop_done_packed
            placeholder.pending = None
            return
        batch.rows[i] = go_on[0]
        for row in go_on[1:]:
            slot = len(batch.rows)
            batch.slots.reserve(slot + 1, row.length + 1)
            batch.slots.copy(i, slot, row.length)
            batch.rows.append(row)

    def _drop_done_packed(self) -> None:
        batch = self._batch
        drop = []
        for i, r in enumerate(batch.rows):
            req = r.request
            if req.cancelled.is_set() and not req.done.is_set():
                req.fail(Unavailable("cancelled: the client disconnected."))
                self._finished(req)
            if req.done.is_set() or r.choice is None or (r.pending is None and r.choice.finished):
                drop.append(i)
        if drop:
            batch.remove(drop)
        self.scheduler.running_rows = len(batch)

    def _generator(self, req: GenerationRequest, index: int) -> torch.Generator | None:
        if req.params.greedy:
            return None
        seed = req.params.seed if req.params.seed is not None else random.randrange(2**62)
        g = torch.Generator(device=self.model.device)
        g.manual_seed(int(seed) + index)
        return g

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def _step(self) -> None:
        """One decode step for every row, then drop the rows that are done."""
        batch = self._batch
        self._drop_done()
        if not batch:
            return
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
                self._finished(req)
            self._batch = _Batch()
            return
        batch.kv = cache_tensors(_cache_of(out))
        batch.width += 1
        for r in rows:
            r.length += 1
        self._sample(rows, out.logits[:, -1].float())
        self.steps += 1
        seconds = time.perf_counter() - t0
        self.scheduler.step_seconds = 0.9 * self.scheduler.step_seconds + 0.1 * seconds
        if self.metrics is not None:
            self.metrics.step(len(rows), self.scheduler.queue_depth)
        self._drop_done()

    def _drop_done(self) -> None:
        batch = self._batch
        keep = []
        for i, r in enumerate(batch.rows):
            req = r.request
            if req.cancelled.is_set() and not req.done.is_set():
                req.fail(Unavailable("cancelled: the client disconnected."))
                self._finished(req)
            if not r.choice.finished and not req.done.is_set():
                keep.append(i)
        batch.keep(keep)
        self.scheduler.running_rows = len(batch)

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> list[int]:
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
                token = greedy[i] if params.greedy else _sample_one(logits[i], params, r.generator)
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
                    self._finished(req)
            except Exception as err:  # noqa: BLE001  (only this request fails: _fail_one logs it)
                self._fail_one(req, err, "while sampling")
        return go_on

    def _first_tokens(
        self, req: GenerationRequest, logits: torch.Tensor, length: int
    ) -> tuple[list[_Row], list[int]]:
        """A row per choice of a prefilled request (`length` tokens in its KV), each row's first
        token sampled from its row of `logits`, and its prompt tokens counted; returns the rows
        and the indices of those that go on."""
        rows = [_Row(req, c, self._generator(req, c.index), length) for c in req.choices]
        keep = self._sample(rows, logits)
        if self.metrics is not None:
            self.metrics.prompt_tokens(self._label(req), len(req.prompt_ids))
        return rows, keep

    def _fail_one(self, req: GenerationRequest, err: Exception, when: str) -> None:
        """`req` alone fails (with `err` when it is a `ServeError`, else a 500) and is finished."""
        logger.debug("request %s failed %s", req.id, when, exc_info=err)
        req.fail(err if isinstance(err, ServeError) else InternalError(f"generation failed: {err}"))
        self._finished(req)

    def _label(self, req: GenerationRequest) -> str:
        return req.adapter or self.base_id

    def _finished(self, req: GenerationRequest) -> None:
        if self.metrics is not None and req.done.is_set() and not getattr(req, "_counted", False):
            req._counted = True
            self.metrics.finished(req, self._label(req))


def _marker_at(req: GenerationRequest) -> list[int] | None:
    """`prompt_positions` for a request of an adapter placed at a marker (else None)."""
    return None if req.prompt_position is None else [req.prompt_position]


def _idx(values: list[int], device: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _cache_of(out: Any) -> Any:
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def _sample_one(logits: torch.Tensor, params: Any, generator: torch.Generator | None) -> int:
    """Temperature and nucleus (top_p) sampling of one row."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        drop = cumulative - sorted_probs >= params.top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))
