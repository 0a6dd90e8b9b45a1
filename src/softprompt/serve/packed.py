"""Packed steps: prefill and decode tokens of many rows in one forward pass, no padding.

Continuous batching's cost on a small model is the number of forward passes, each a read
of every weight. A packed step feeds every running row's next token *and* the prompt
tokens of rows still prefilling (a chunk of them, within a token budget) as one sequence
of `T` tokens; the matmuls see `(1, T, hidden)` whatever the rows' lengths. Only attention
is per row: each row owns a slot of preallocated key/value buffers (`KVSlots`, per layer
`(slots, kv_heads, capacity, head_dim)`, a row's columns left-aligned from 0), the step's
new keys/values are written into their slots (`PackedCache.update`), and the packed
queries are laid out `(rows, heads, q_max, head_dim)` for one SDPA call over the rows'
slots with a mask that shows each query its own row's columns up to itself
(`attention`). A row's prompt KV (the adapter's virtual tokens, computed once) is copied
into its slot's first columns when it joins, so the positions are the attended columns,
as in `softprompt.core.layout`, and a row gives the numbers it gives alone.

The attention function is registered with transformers' `AttentionInterface` and selected
only for the duration of a packed forward (`packed_forward`); an architecture whose
attention does not go through that interface is found by `probe` and served by the
padded engine instead.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from softprompt.core.attention import grouped_sdpa, register_attention

NAME = "softprompt_serve_packed"  # not attention.PACKED_ATTENTION (the training pass)


@lru_cache(maxsize=1)
def register() -> bool:
    """Register the packed attention function with transformers (once)."""

    return register_attention(NAME, attention)


@dataclass
class StepLayout:
    """Where each of a step's `T` packed tokens goes (all on the model's device).

    Attention runs in two groups, so that a row decoding one token does not pay for the
    longest prompt chunk of the step: the rows that feed one token (decoding rows, and a
    prompt's last single token) as one query each over all rows' slots, and the rows that
    feed several (prompt chunks) padded to the longest chunk, over their own slots only.

    slot, column: each token's row slot and key/value column (also its position).
    rows, width: active rows (slots 0..rows-1) and the columns attention reads.
    mask: `(rows, 1, 1, width)` bool: the columns a row's one query sees (up to its length).
    single_tokens, single_slots: the tokens of one-token rows and their slots (None when
        every row feeds one token, in slot order: then token i is row i's).
    multi_rows: the slots of the rows that feed several tokens (None: there are none);
        multi_tokens, multi_rank, multi_query: their tokens, each one's row among them and
        its index among its row's queries; multi_mask `(len(multi_rows), 1, q_max, width)`:
        query j of such a row sees columns up to its length + j; q_max: the longest chunk.
    """

    slot: torch.Tensor
    column: torch.Tensor
    rows: int
    width: int
    mask: torch.Tensor
    single_tokens: torch.Tensor | None
    single_slots: torch.Tensor | None
    multi_rows: torch.Tensor | None
    multi_tokens: torch.Tensor | None
    multi_rank: torch.Tensor | None
    multi_query: torch.Tensor | None
    multi_mask: torch.Tensor | None
    q_max: int
    multi_all: bool = False  # every row feeds several tokens: the multi rows are all the slots

    @classmethod
    def build(cls, lengths: list[int], feeds: list[int], device: torch.device) -> StepLayout:
        """Rows `0..len(lengths)-1` with `lengths[i]` columns filled feed `feeds[i]` tokens each."""
        slot, column = [], []
        single_tokens, single_slots, multi_rows, multi_tokens, multi_rank, multi_query = (
            [],
            [],
            [],
            [],
            [],
            [],
        )
        for i, (n, q) in enumerate(zip(lengths, feeds)):
            first = len(slot)
            slot += [i] * q
            column += range(n, n + q)
            if q == 1:
                single_tokens.append(first)
                single_slots.append(i)
            elif q > 1:
                multi_tokens += range(first, first + q)
                multi_rank += [len(multi_rows)] * q
                multi_query += range(q)
                multi_rows.append(i)
        rows = len(lengths)
        width = max(n + q for n, q in zip(lengths, feeds))
        start = torch.tensor(lengths, device=device).view(-1, 1, 1, 1)
        c = torch.arange(width, device=device).view(1, 1, 1, -1)
        mask = c <= start
        every_row_one = len(single_slots) == rows == len(slot)
        single = (None, None) if every_row_one or not single_slots else (single_tokens, single_slots)
        q_max, multi = 1, (None, None, None, None, None)
        if multi_rows:
            q_max = max(feeds)
            index = _long(multi_rows, device)
            j = torch.arange(q_max, device=device).view(1, 1, -1, 1)
            multi_mask = c <= start.index_select(0, index) + j  # padding queries see column 0 on
            multi = (
                index,
                _long(multi_tokens, device),
                _long(multi_rank, device),
                _long(multi_query, device),
            )
            multi = (*multi, multi_mask)
        return cls(
            _long(slot, device),
            _long(column, device),
            rows,
            width,
            mask,
            *(None if v is None else _long(v, device) for v in single),
            *multi,
            q_max=q_max,
            multi_all=len(multi_rows) == rows,
        )

    @property
    def every_row_one(self) -> bool:
        """Every row feeds one token (decoding only): token i is row i's."""
        return self.multi_rows is None and self.single_tokens is None


def _long(values: list[int], device: Any) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


class KVSlots:
    """Per-layer key/value buffers `(slots, kv_heads, capacity, head_dim)`, grown on demand."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: Any) -> None:
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]
        self.values: list[torch.Tensor] = [self._empty(0, 0) for _ in range(layers)]

    def _empty(self, slots: int, capacity: int) -> torch.Tensor:
        heads, dim = self.shape
        return torch.zeros(slots, heads, capacity, dim, dtype=self.dtype, device=self.device)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, slots: int, capacity: int) -> None:
        """At least `slots` rows of at least `capacity` columns (doubling, contents kept)."""
        if slots <= self.slots and capacity <= self.capacity:
            return
        new_slots = max(slots, min(2 * self.slots, slots + 64)) if slots > self.slots else self.slots
        new_cap = max(capacity, 2 * self.capacity, 64) if capacity > self.capacity else self.capacity
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = self._empty(new_slots, new_cap)
                new[: old.shape[0], :, : old.shape[2]] = old
                store[i] = new

    def put(self, slot: int, kv: list[tuple[torch.Tensor, torch.Tensor]], length: int) -> None:
        """Write `length` columns of a single row's per-layer `(1, kv_heads, L, head_dim)` KV
        (its last `length` columns) into `slot` from column 0."""
        for layer, (k, v) in enumerate(kv):
            self.keys[layer][slot, :, :length] = k[0, :, k.shape[2] - length :]
            self.values[layer][slot, :, :length] = v[0, :, v.shape[2] - length :]

    def copy(self, source: int, target: int, length: int) -> None:
        """Slot `target` gets the first `length` columns of slot `source`."""
        if source == target or length == 0:
            return
        for store in (self.keys, self.values):
            for t in store:
                t[target, :, :length] = t[source, :, :length]


class PackedCache:
    """The cache a packed forward hands the model: writes each layer's new keys/values into
    the rows' slots and gives attention the active rows' buffers."""

    is_compileable = False

    def __init__(self, slots: KVSlots, layout: StepLayout) -> None:
        self.slots = slots
        self.layout = layout

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        lay = self.layout
        k_store, v_store = self.slots.keys[layer_idx], self.slots.values[layer_idx]
        # (1, kv_heads, T, dim) -> (T, kv_heads, dim), one row of the store per token
        k_store[lay.slot, :, lay.column] = key[0].transpose(0, 1).to(k_store.dtype)
        v_store[lay.slot, :, lay.column] = value[0].transpose(0, 1).to(v_store.dtype)
        return k_store[: lay.rows, :, : lay.width], v_store[: lay.rows, :, : lay.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.slots.keys)


def attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA over each row's slot for packed queries `(1, heads, T, dim)`; returns `(1, T, heads, dim)`."""

    lay: StepLayout | None = kwargs.pop("softprompt_layout", None)
    if lay is None:  # not a packed forward: plain SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError("packed serving does not support attention logit soft-capping (softcap).")
    heads, dim = query.shape[1], query.shape[3]
    tokens = query[0].transpose(0, 1)  # (T, heads, dim)
    if lay.every_row_one:  # token i is row i's query
        out = grouped_sdpa(tokens.unsqueeze(2), key, value, lay.mask, scaling)  # (rows, heads, 1, dim)
        return out.transpose(1, 2).transpose(0, 1), None
    out = tokens.new_empty(tokens.shape)
    if lay.single_tokens is not None:  # one query per row over all slots; other rows' are unused
        one = tokens.new_zeros(lay.rows, heads, dim)
        one[lay.single_slots] = tokens[lay.single_tokens]
        got = grouped_sdpa(one.unsqueeze(2), key, value, lay.mask, scaling)
        out[lay.single_tokens] = got[lay.single_slots, :, 0]
    if lay.multi_rows is not None:  # prompt chunks, padded to the longest, over their rows' slots
        keys, values = key, value
        if not lay.multi_all:
            keys, values = key.index_select(0, lay.multi_rows), value.index_select(0, lay.multi_rows)
        chunks = tokens.new_zeros(len(lay.multi_rows), lay.q_max, heads, dim)
        chunks[lay.multi_rank, lay.multi_query] = tokens[lay.multi_tokens]
        got = grouped_sdpa(chunks.transpose(1, 2), keys, values, lay.multi_mask, scaling).transpose(1, 2)
        out[lay.multi_tokens] = got[lay.multi_rank, lay.multi_query]
    return out.unsqueeze(0), None


@contextmanager
def packed_attention(config: Any):
    """Select the packed attention function on `config` for the duration of a forward.

    Not `attention.attention_implementation`: `set_attn_implementation` costs about 0.5 ms a
    switch, on every step; only this thread uses the model, so setting the config suffices.
    """
    register()
    old = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = old


def packed_forward(
    base: torch.nn.Module,
    cache_key: str,
    ids: torch.Tensor,
    layout: StepLayout,
    slots: KVSlots,
    keep: torch.Tensor,
) -> torch.Tensor:
    """One packed forward of `ids` `(T,)` laid out by `layout`; the logits of the packed
    tokens at `keep` `(K, vocab)`."""
    dummy = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=ids.device)  # a 4D mask: no mask building
    with packed_attention(base.config):
        out = base(
            input_ids=ids.unsqueeze(0),
            position_ids=layout.column.unsqueeze(0),
            attention_mask=dummy,
            use_cache=True,
            logits_to_keep=keep,
            softprompt_layout=layout,
            **{cache_key: PackedCache(slots, layout)},
        )
    return out.logits[0]
