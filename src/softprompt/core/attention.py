"""Which attention implementation a forward pass runs with, switched for one block:
eager attention for bfloat16 training steps on CPU, a grouped-query sdpa variant for
passes that start from a cached prompt, and the attention of a packed training pass (one
prompt and every row of a batch in one sequence); and how many masked key columns make a
cached prompt's keys a length the CPU's bfloat16 sdpa kernel runs fast on."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask


@contextmanager
def attention_implementation(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with transformers attention implementation `name` ("eager", "sdpa"...),
    then restore the model's own. A no-op for `None`, for the current implementation, and
    for models that cannot switch."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if name is None or current is None or current == name or can_switch is None or not can_switch():
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


EAGER_MAX_TOKENS = 512


def training_attention(model: nn.Module, bf16: bool, device: torch.device, positions: int) -> str | None:
    """The attention implementation for a training batch of `positions` per row (prompt
    included): "eager" for bfloat16 on CPU, None (the model's own) otherwise.

    PyTorch's CPU flash-attention backward is slow in bfloat16; plain matmul attention
    uses the CPU's bfloat16 units and made a SmolLM2-135M training step about 30% faster
    (1.25 s against 1.81 s for 16 reviews, 50 virtual tokens). Only rows of at most
    `EAGER_MAX_TOKENS` positions get it, where eager's L×L score matrices stay small.
    """
    if not bf16 or device.type != "cpu" or positions > EAGER_MAX_TOKENS:
        return None
    return (
        "eager" if getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa" else None
    )


PREFIX_ATTENTION = "softprompt_sdpa"
_GQA_IN_SDPA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa
# Attention arguments that change the computation beyond a plain masked softmax.
_SPECIAL_ATTENTION = ("softcap", "position_bias", "s_aux", "sinks", "output_attentions", "head_mask")


def _prefix_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that grouped-query attention with a mask on CPU
    runs on the key/value heads as they are (`enable_gqa`) instead of copying them to every
    query head: a cached prompt always brings a mask (its queries and keys differ in
    length), and the copies and their backward cost about a quarter of the attention time.

    The mask arrives additive (see `_prefix_mask`); where transformers' own sdpa runs
    instead it gets the boolean mask back."""

    plain = not any(
        kwargs.get(name) is not None and kwargs.get(name) is not False for name in _SPECIAL_ATTENTION
    )
    if (
        plain
        and attention_mask is not None
        and query.device.type == "cpu"
        and query.shape[2] > 1
        and key.shape[1] != query.shape[1]
    ):
        if attention_mask.dtype != torch.bool and attention_mask.dtype != query.dtype:
            attention_mask = attention_mask.to(query.dtype)  # 0 and -inf: exact in any float dtype
        dropout = float(kwargs.get("dropout", 0.0) or 0.0)
        out = grouped_sdpa(query, key, value, attention_mask, kwargs.get("scaling"), dropout)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask == 0  # back to what transformers' sdpa mask function gives
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def grouped_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA `(batch, heads, q, dim)` over keys/values with as many or fewer heads, which are
    used as they are (`enable_gqa`): transformers' sdpa copies them to every query head
    whenever there is a mask on the CPU, which costs more than the attention itself at
    these sizes. The same numbers as with the copies."""
    return torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
        enable_gqa=key.shape[1] != query.shape[1],
    )


def _prefix_mask(*args: object, dtype: torch.dtype = torch.float32, **kwargs: object) -> torch.Tensor | None:
    """transformers' sdpa mask, made additive once per forward pass: 0 where a key is attended,
    -inf elsewhere, in `dtype` (the inputs' dtype).

    PyTorch's sdpa turns a boolean mask into exactly this tensor (in the query's dtype) on
    every call, forward and backward, i.e. twice per layer in a training step; here it is
    built once for all layers. The attention's results are bit-identical."""

    mask = sdpa_mask(*args, **kwargs)
    if mask is None or mask.dtype != torch.bool or not dtype.is_floating_point:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, float("-inf"))


def register_attention(
    name: str, function: Callable[..., Any], mask: Callable[..., Any] | None = None
) -> bool:
    """Register an attention `function` (and its mask function, if any) with transformers
    under `name`."""
    AttentionInterface.register(name, function)
    if mask is not None:
        AttentionMaskInterface.register(name, mask)
    return True


@lru_cache(maxsize=1)
def _register_prefix_attention() -> bool:
    sdpa = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    # a transformers whose sdpa mask function this module does not know keeps its own
    mask = _prefix_mask if sdpa.__name__ == "sdpa_mask" else sdpa
    return register_attention(PREFIX_ATTENTION, _prefix_sdpa, mask)


def prefix_attention(model: nn.Module, device: torch.device) -> str | None:
    """The attention implementation for a forward pass that starts from a cached prompt:
    `PREFIX_ATTENTION` for grouped-query sdpa models on CPU (see `_prefix_sdpa`), else None
    (the model's own)."""
    config = getattr(model, "config", None)
    if device.type != "cpu" or not _GQA_IN_SDPA or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    heads, kv_heads = (
        getattr(config, "num_attention_heads", None),
        getattr(config, "num_key_value_heads", None),
    )
    if not heads or not kv_heads or kv_heads == heads:
        return None
    return PREFIX_ATTENTION if _register_prefix_attention() else None


#: PyTorch's CPU sdpa kernel (flash attention) in bfloat16 is fastest for key lengths that
#: are multiples of this.
KEY_ALIGNMENT = 16


def key_padding(model: nn.Module, device: torch.device, dtype: torch.dtype, keys: int) -> int:
    """Masked key columns to put in front of a cached prompt so that a pass attending over
    `keys` keys (prompt plus input) attends over a multiple of `KEY_ALIGNMENT` instead.

    Only for bfloat16 sdpa attention on CPU (`dtype`, or bfloat16 autocast): there the
    kernel's time per layer jumps for other lengths (SmolLM2-135M, 32 rows of 64 queries:
    1.8 ms for 114 keys, 1.5 ms for 128 with the extra 14 masked; 1.8 ms for 84, 1.3 ms for
    96). Masked keys take no part in the softmax, so the results are those of the unpadded
    keys up to rounding (the kernel blocks its sums differently: last-bit differences in
    bfloat16). 0 elsewhere (float32 attention gets no faster).
    """
    if device.type != "cpu":
        return 0
    autocast = torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    if dtype != torch.bfloat16 and not autocast:
        return 0
    if getattr(getattr(model, "config", None), "_attn_implementation", None) not in (
        "sdpa",
        PREFIX_ATTENTION,
    ):
        return 0
    return -keys % KEY_ALIGNMENT


# ---------------------------------------------------------------------- packed training pass
PACKED_ATTENTION = "softprompt_packed"


@dataclass(frozen=True)
class PackedPlan:
    """How one packed sequence `[prompt (N)][row 1 (L)]...[row B (L)]` attends.

    The prompt's tokens attend causally to each other; every row's tokens attend to the
    whole prompt and causally to their own row, as in a pass from the prompt's cached KV
    (see `softprompt.core.prefix`). The prompt's weights are then read once with the batch's
    instead of in a pass of its own, forward and backward.

    Attributes:
        prompt: N, the prompt's tokens (first in the sequence).
        rows: B.
        length: L, each row's tokens.
        mask: `(B, 1, L, pad + N + L)` additive (0 / -inf, the queries' dtype): row b's
            queries against `pad` zero keys (masked, see `key_padding`), the prompt's
            keys and the row's own keys.
    """

    prompt: int
    rows: int
    length: int
    mask: torch.Tensor


_PLAN: ContextVar[PackedPlan | None] = ContextVar("softprompt_packed_plan", default=None)


def packed_mask(attention_mask: torch.Tensor, prompt: int, pad: int, dtype: torch.dtype) -> torch.Tensor:
    """`PackedPlan.mask` from a batch's `(B, N + L)` attention mask (prompt columns first).

    As transformers' causal mask for a pass after N cached positions: key j is attended by
    query i when it is not padding and `j <= i + N`."""
    batch, total = attention_mask.shape
    length = total - prompt
    device = attention_mask.device
    causal = (
        torch.arange(total, device=device)[None, :] <= torch.arange(length, device=device)[:, None] + prompt
    )
    allowed = (attention_mask.bool()[:, None, :] & causal[None]).unsqueeze(1)  # (B, 1, L, N + L)
    if pad:
        allowed = torch.cat([allowed.new_zeros(batch, 1, length, pad), allowed], dim=-1)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, float("-inf"))


def supports_packing(model: nn.Module) -> bool:
    """Whether `model`'s attention can be run as a packed pass: sdpa attention (the packed
    pass computes exactly what sdpa does, in two calls) that can be switched."""
    config = getattr(model, "config", None)
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or can_switch is None or not can_switch():
        return False
    heads = getattr(config, "num_attention_heads", None)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return (_GQA_IN_SDPA or kv_heads == heads) and _register_packed_attention()


@contextmanager
def packed(model: nn.Module, plan: PackedPlan) -> Iterator[None]:
    """Run the block's forward passes of `model` as packed passes laid out by `plan`."""
    token = _PLAN.set(plan)
    try:
        with attention_implementation(model, PACKED_ATTENTION):
            yield
    finally:
        _PLAN.reset(token)


def _packed_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """sdpa attention of a packed sequence `(1, heads, N + B * L, head_dim)` (see
    `PackedPlan`): the prompt's causal attention, and the rows' attention over the prompt's
    keys and their own, as a batch of B."""

    plan = _PLAN.get()
    if plan is None:  # not a packed pass (the model called outside `packed`)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    n, rows, length = plan.prompt, plan.rows, plan.length
    special = [k for k in _SPECIAL_ATTENTION if kwargs.get(k) is not None and kwargs.get(k) is not False]
    if special or query.shape[0] != 1 or query.shape[2] != n + rows * length:
        raise NotImplementedError(
            f"a packed pass cannot run this attention ({', '.join(special) or 'unexpected shapes'}); "
            "call the model with return_logits=True."
        )
    dropout = float(kwargs.get("dropout", 0.0) or 0.0)
    scale = kwargs.get("scaling")
    gqa = {"enable_gqa": True} if key.shape[1] != query.shape[1] else {}  # torch >= 2.5 (supports_packing)

    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (1, heads, N + B * L, d) -> the prompt's (1, heads, N, d), the rows' (B, heads, L, d);
        # one split (its backward concatenates) rather than two slices (each zero-filling a
        # gradient of the whole)
        prompt, own = x.split([n, rows * length], dim=2)
        return prompt, own[0].unflatten(1, (rows, length)).transpose(0, 1)

    (q_prompt, q_rows), (k_prompt, k_rows), (v_prompt, v_rows) = split(query), split(key), split(value)
    pad = plan.mask.shape[-1] - n - length

    def row_keys(prompt: torch.Tensor, own: torch.Tensor) -> torch.Tensor:  # (B, kv_heads, pad + N + L, d)
        parts = [prompt.expand(rows, -1, -1, -1), own]
        if pad:
            parts.insert(0, own.new_zeros(rows, own.shape[1], pad, own.shape[3]))
        return torch.cat(parts, dim=2)

    sdpa = torch.nn.functional.scaled_dot_product_attention
    out_prompt = sdpa(q_prompt, k_prompt, v_prompt, dropout_p=dropout, is_causal=True, scale=scale, **gqa)
    mask = plan.mask if plan.mask.dtype == query.dtype else plan.mask.to(query.dtype)
    out_rows = sdpa(
        q_rows,
        row_keys(k_prompt, k_rows),
        row_keys(v_prompt, v_rows),
        attn_mask=mask,
        dropout_p=dropout,
        scale=scale,
        **gqa,
    )  # (B, heads, L, d)
    heads, dim = out_rows.shape[1], out_rows.shape[3]
    out = torch.cat(
        [out_prompt.transpose(1, 2), out_rows.transpose(1, 2).reshape(1, rows * length, heads, dim)], dim=1
    )
    return out, None  # (1, N + B * L, heads, d), as transformers' sdpa returns it


def _no_mask(*args: object, **kwargs: object) -> None:
    """The packed pass's mask function: the plan holds the mask."""


@lru_cache(maxsize=1)
def _register_packed_attention() -> bool:
    return register_attention(PACKED_ATTENTION, _packed_sdpa, _no_mask)
