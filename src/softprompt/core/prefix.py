"""The prompt's keys and values, computed once instead of for every example (and the
right-aligned batching of per-prompt tensors that prompts and caches share).

In a causal decoder the virtual tokens come first (positions 0..N-1) and attend only to
each other, so every layer's keys and values at those positions are the same for every
input. `PromptKV` computes them once per adapter (batch of one) and hands the model a
cache that already holds them; the model then processes only the user's tokens:

- inference: the prompt KV is kept and reused until the prompt tensor changes (an
  optimizer step, `load_adapter`, a dtype/device change) - the prompt costs nothing per
  request;
- training: within a step every example shares the prompt, so its KV is computed once
  (with gradients) and broadcast to the batch; gradients flow back through it once.

Where this cannot hold the plain path (prompt embeddings in front of the input) is used
automatically: encoders and encoder-decoders (the prompt attends to the input), models
with sliding-window, chunked or linear-attention layers (the prefix would fall out of
the window or be folded into a recurrent state), models that take no `position_ids`, and
calls that ask for per-token outputs of the prompt columns (`full_sequence=True`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from softprompt.core import introspect


def supports_prefix_cache(base: nn.Module) -> bool:
    """Whether the prompt's KV is input-independent and can be fed as a cache to `base`."""
    if not introspect.is_causal_decoder(base) or not introspect.accepts(base, "position_ids"):
        return False
    if introspect.cache_kwarg(base) not in introspect.forward_params(type(base)):
        return False
    try:
        cache = DynamicCache(config=base.config)
    except Exception:  # noqa: BLE001  (a config the cache classes do not understand)
        return False
    layers = getattr(cache, "layers", [])
    return all(type(layer).__name__ == "DynamicLayer" for layer in layers)


def backbone(base: nn.Module) -> nn.Module:
    """The transformer body of a model with a head (`model`, `transformer`...), or the model."""
    body = getattr(base, getattr(base, "base_model_prefix", ""), None)
    return body if isinstance(body, nn.Module) else base


def cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per-layer (keys, values), each `(batch, kv_heads, seq, head_dim)`."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def make_cache(base: nn.Module, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:

    return DynamicCache(ddp_cache_data=tensors, config=base.config)


@dataclass
class PromptState:
    """One adapter's prompt as the model has processed it."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer, (1, kv_heads, N, head_dim)
    last_logits: torch.Tensor | None  # (1, V): the last virtual token's next-token logits (causal LM)
    key: tuple | None = None
    values: torch.Tensor | None = None  # a copy of the prompt it was computed from


def state_nbytes(state: PromptState) -> int:
    """Bytes held by a remembered prompt state (its KV, logits and prompt copy)."""
    tensors = [t for pair in state.kv for t in pair] + [state.last_logits, state.values]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class PromptKV:
    """Computes and (for inference) remembers each adapter's prompt KV.

    Args:
        budget_bytes: At most this many bytes of remembered prompt states (None: no
            limit). Past it the least recently used adapters' states are dropped and
            computed again on their next use; a state larger than the whole budget is
            used but not kept.

    Attributes:
        hits: Calls served from a remembered state.
        misses: Calls that computed the state (first use, a changed prompt, an eviction).
        evictions: States dropped to stay within the budget.
    """

    def __init__(self, budget_bytes: int | None = None) -> None:
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be None or >= 0, got {budget_bytes}.")
        self.budget_bytes = budget_bytes
        self._store: OrderedDict[str, tuple[PromptState, int]] = OrderedDict()  # least recent first
        self._nbytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self._computed_ahead: set[str] = set()  # computed by `compute_missing`, not yet asked for

    def __contains__(self, adapter: object) -> bool:
        return adapter in self._store

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes held by the remembered prompt states."""
        return self._nbytes

    def evict(self, adapter: str) -> bool:
        """Forget one adapter's remembered state; whether there was one."""
        entry = self._store.pop(adapter, None)
        self._computed_ahead.discard(adapter)
        if entry is not None:
            self._nbytes -= entry[1]
        return entry is not None

    def clear(self, adapter: str | None = None) -> None:
        """Forget remembered prompt KV (all adapters, or one)."""
        if adapter is None:
            self._store.clear()
            self._computed_ahead.clear()
            self._nbytes = 0
        else:
            self.evict(adapter)

    def _remember(self, adapter: str, state: PromptState) -> None:
        self.evict(adapter)
        size = state_nbytes(state)
        if self.budget_bytes is not None and size > self.budget_bytes:
            return  # alone over budget: used for this call, not kept
        self._store[adapter] = (state, size)
        self._nbytes += size
        while self.budget_bytes is not None and self._nbytes > self.budget_bytes:
            oldest = next(iter(self._store))
            self.evict(oldest)
            self.evictions += 1

    @staticmethod
    def _key(prompt: torch.Tensor, dtype: torch.dtype, base: nn.Module) -> tuple:
        autocast = (
            torch.is_autocast_enabled("cpu") if prompt.device.type == "cpu" else torch.is_autocast_enabled()
        )
        return (
            dtype,
            prompt.device,
            base.training,
            autocast,
            torch.get_autocast_dtype(prompt.device.type) if autocast else None,
        )

    def _fresh(self, model: Any, adapter: str, dtype: torch.dtype, with_logits: bool) -> PromptState | None:
        """The remembered state of `adapter` if it is still valid for this call, else None."""
        prompt = model.prompts[adapter].embedding
        if torch.is_grad_enabled() and prompt.requires_grad:
            return None
        entry = self._store.get(adapter)
        cached = entry[0] if entry is not None else None
        if (
            cached is not None
            and cached.key == self._key(prompt, dtype, model.base_model)
            and (cached.last_logits is not None or not with_logits)
            and torch.equal(cached.values, prompt.detach())
        ):  # any change, `.data` writes included
            return cached
        return None

    def get(self, model: Any, adapter: str, dtype: torch.dtype, with_logits: bool) -> PromptState:
        """The prompt state of `adapter`; recomputed when gradients are needed or it changed."""
        cached = self._fresh(model, adapter, dtype, with_logits)
        if cached is not None:
            self._store.move_to_end(adapter)
            if adapter in self._computed_ahead:  # its miss was counted by `compute_missing`
                self._computed_ahead.discard(adapter)
            else:
                self.hits += 1
            return cached
        prompt = model.prompts[adapter].embedding
        state = self._compute(model, [adapter], dtype, with_logits)[0]
        if torch.is_grad_enabled() and prompt.requires_grad:
            return state
        self._keep(model, adapter, dtype, state)
        return state

    def _keep(self, model: Any, adapter: str, dtype: torch.dtype, state: PromptState) -> None:
        prompt = model.prompts[adapter].embedding
        self.misses += 1
        state.key = self._key(prompt, dtype, model.base_model)
        state.values = prompt.detach().clone()
        self._remember(adapter, state)

    @torch.no_grad()
    def compute_missing(self, model: Any, adapters: list[str], dtype: torch.dtype) -> int:
        """Compute the states of those of `adapters` not remembered (or stale) in one forward
        pass and remember them; how many it computed.

        The serving engine calls it with the adapters of the requests joining a step, so
        several misses cost one pass instead of one each. Each prompt sits at positions
        0..N-1 of its row and later columns are padding, so causal attention gives every
        row the keys/values it gets alone (up to float rounding of the wider matmuls).
        (More than the budget holds: the first ones are dropped again and `get` computes
        them when asked.)
        """
        missing = [a for a in dict.fromkeys(adapters) if self._fresh(model, a, dtype, False) is None]
        if len(missing) < 2:
            return 0  # `get` computes a lone one as it always has
        for adapter, state in zip(missing, self._compute(model, missing, dtype, False)):
            self._keep(model, adapter, dtype, state)
            self._computed_ahead.add(adapter)
        return len(missing)

    @staticmethod
    def _compute(model: Any, adapters: list[str], dtype: torch.dtype, with_logits: bool) -> list[PromptState]:
        """The states of `adapters`' prompts from one forward pass, a row each, right-padded."""
        base = model.base_model
        prompts = [model.prompts[a](dtype) for a in adapters]  # (N_i, H)
        lengths = [p.shape[0] for p in prompts]
        n = max(lengths)
        embeds = torch.stack([torch.cat([p, p.new_zeros(n - len(p), p.shape[1])]) for p in prompts])
        device = embeds.device
        positions = torch.arange(n, device=device).unsqueeze(0) + model.position_style.offset
        mask = (torch.arange(n, device=device) < torch.tensor(lengths, device=device).unsqueeze(1)).long()
        inputs = {
            "inputs_embeds": embeds,
            "attention_mask": mask,
            "position_ids": positions.expand(len(prompts), -1),
            "use_cache": True,
        }
        if with_logits:  # one adapter (`get`): the last virtual token's logits
            out = base(**inputs, logits_to_keep=1)
            logits = [out.logits[:, -1]]
        else:
            out = backbone(base)(**inputs)
            logits = [None] * len(prompts)
        kv = cache_tensors(out.get("cache") if out.get("cache") is not None else out.get("past_key_values"))
        if len(prompts) == 1:
            return [PromptState(kv, logits[0])]
        rows = [
            [(k[i : i + 1, :, :m].clone(), v[i : i + 1, :, :m].clone()) for k, v in kv]
            for i, m in enumerate(lengths)
        ]
        return [PromptState(row, None) for row in rows]


def right_aligned(table: list[torch.Tensor], which: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Per-row copies of per-prompt tensors, each right-aligned in `width` positions.

    Args:
        table: One tensor per distinct prompt (the same shape except along `dim`).
        which: `(B,)` index into `table` for every row of the batch.
        width: Positions along `dim` after padding (at least the longest entry's).
        dim: The position dimension of the entries.

    Returns:
        `(B, *entry_shape)` with `entry_shape[dim] == width`; zeros left of shorter entries.
    """
    padded = []
    for t in table:
        shape = list(t.shape)
        shape[dim] = width - t.shape[dim]
        padded.append(torch.cat([t.new_zeros(shape), t], dim=dim))
    return torch.stack(padded).index_select(0, which)


def _cache_holding(base: nn.Module, tensors: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """`make_cache(base, tensors)` without copying the tensors into the cache.

    A `DynamicCache` built from data concatenates every layer's keys and values onto an
    empty tensor, a copy of the whole prompt KV at batch size (the broadcast one
    materialised), and the forward pass's first update concatenates it again with the new
    tokens' keys/values. Handing the layers the tensors as they are leaves that second
    concatenation as the only copy; the values, and the gradients (the backward of the
    broadcast still sums over the batch), are unchanged. Falls back to `make_cache` for
    layers other than transformers' `DynamicLayer`.
    """

    cache = DynamicCache(config=base.config)
    layers = getattr(cache, "layers", None)
    if (
        not isinstance(layers, list)
        or len(layers) != len(tensors)
        or any(type(layer).__name__ != "DynamicLayer" or layer.is_initialized for layer in layers)
    ):
        return make_cache(base, tensors)
    for layer, (keys, values) in zip(layers, tensors, strict=True):
        layer.device = keys.device
        layer.keys, layer.values = keys, values
        layer.is_initialized = True
    return cache


def _left_padded(t: torch.Tensor, width: int) -> torch.Tensor:
    """`(1, heads, N, head_dim)` with zeros in front up to `width` positions (as is if N == width)."""
    extra = width - t.shape[2]
    return t if extra <= 0 else torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)


def batch_cache(
    model: Any, states: dict[str, PromptState], names: list[str | None], width: int
) -> tuple[Any, torch.Tensor | None]:
    """A cache holding each row's prompt KV, right-aligned in `width` columns.

    Returns:
        The cache for `base`, and the rows' last-virtual-token logits `(B, V)` (zeros for
        rows without a prompt) when the states carry them.
    """
    unique = [n for n in dict.fromkeys(names)]
    batch = len(names)
    base = model.base_model
    if len(unique) == 1 and unique[0] is not None:
        state = states[unique[0]]
        tensors = [
            (
                _left_padded(k, width).expand(batch, -1, -1, -1),
                _left_padded(v, width).expand(batch, -1, -1, -1),
            )
            for k, v in state.kv
        ]
        logits = state.last_logits.expand(batch, -1) if state.last_logits is not None else None
        return _cache_holding(base, tensors), logits
    some = next(states[u] for u in unique if u is not None)
    which = torch.tensor([unique.index(n) for n in names], device=some.kv[0][0].device)
    tensors = []
    for layer in range(len(some.kv)):
        parts = []
        for kind in (0, 1):
            ref = some.kv[layer][kind][0]  # (kv_heads, N, head_dim)
            table = [states[u].kv[layer][kind][0] if u is not None else ref[:, :0] for u in unique]
            parts.append(right_aligned(table, which, width, dim=1))  # (B, kv_heads, width, head_dim)
        tensors.append((parts[0], parts[1]))
    logits = None
    if some.last_logits is not None:
        rows = [
            states[u].last_logits if u is not None else torch.zeros_like(some.last_logits) for u in unique
        ]
        logits = torch.cat(rows).index_select(0, which)
    return _cache_holding(base, tensors), logits
