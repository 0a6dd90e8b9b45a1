"""The forward's paths through the prompts' keys/values (`softprompt.core.prefix`): a prompt
computed once and reused as a KV prefix (`prompt_cache_for`), the loss-only training pass
that packs the prompts into the batch's sequence (`softprompt.core.attention.PackedPlan`),
and continuing from a cache that already holds the prompt. A part of `SoftPromptModel`
(`CachedPrompts`); `uses_prompt_cache` says when a call may take these paths.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from softprompt.core import attention, introspect
from softprompt.core.config import PromptPosition
from softprompt.core.layout import Layout
from softprompt.core.losses import linear_output_layer
from softprompt.core.prefix import batch_cache
from softprompt.core.rows import AdapterNames, PromptPositions, RowPrompt, RowPrompts


class CachedPrompts(RowPrompts):
    """`SoftPromptModel`'s prompt-KV paths (see the module docstring)."""

    # set by SoftPromptModel
    spec: Any
    prompt_kv: Any
    prefix_cache: Any
    _prefix_supported: bool
    training: bool

    def uses_prompt_cache(
        self, adapter_names: AdapterNames, batch_size: int, prompt_positions: PromptPositions = None
    ) -> bool:
        """Whether a call for these rows starts from the prompts' cached KV (see `softprompt.core.prefix`).

        Only prefixes of single adapters do: a prompt at a marker attends to the input in
        front of it, and a combination's later prompts attend to its earlier ones, so both
        take the plain path (the same results)."""
        if not self.prefix_cache or not self._prefix_supported:
            return False
        if self.training and any(
            getattr(m, "gradient_checkpointing", False) is True for m in self.base_model.modules()
        ):
            return False  # transformers returns no cache while checkpointing activations
        names = self.resolve_adapters(adapter_names, batch_size)
        if any(isinstance(n, tuple) for n in names):
            return False
        if any(self.placement(n) is PromptPosition.MARKER for n in names):
            return False
        return self.prompt_width(names) > 0

    def _packs(
        self,
        names: list[RowPrompt],
        labels: torch.Tensor | None,
        return_logits: bool,
        token_type_ids: torch.Tensor | None,
        kwargs: dict[str, Any],
    ) -> bool:
        """Whether a call runs as one packed pass, the prompt in the same sequence as the
        batch (`attention.PackedPlan`) instead of in a pass of its own: a loss-only training
        call (`return_logits=False`, gradients for the prompt) of one prompt for every row,
        on a task, an output layer and an attention that allow it. Results are those of the
        cached prompt's pass up to rounding."""
        if return_logits or labels is None or token_type_ids is not None or not self.spec.packed_training:
            return False
        if set(kwargs) - {"logits_to_keep"} or len(set(names)) != 1 or not isinstance(names[0], str):
            return False
        if not (torch.is_grad_enabled() and self.prompts[names[0]].embedding.requires_grad):
            return False  # inference: the remembered prompt KV costs nothing
        return (
            attention.supports_packing(self.base_model) and linear_output_layer(self.base_model) is not None
        )

    def _packed_inputs(
        self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, names: list[RowPrompt]
    ) -> tuple[Layout, Any, dict[str, Any], attention.PackedPlan]:
        """Layout, head routing, the base model's inputs for one sequence
        `[prompt][row 1]...[row B]` `(1, N + B * L)`, and its attention plan."""
        batch_size, length, hidden = embeds.shape
        layout, routing = self.layout(None, attention_mask, names, batch_size, length)
        layout.prompt_cached = True  # outputs come back per row, without the prompt's columns
        prompt = self.prompts[names[0]](embeds.dtype).to(embeds.device)  # (N, H)
        n = prompt.shape[0]
        positions = torch.cat(
            [
                torch.arange(n, device=embeds.device) + self.position_style.offset,
                layout.position_ids[:, n:].reshape(-1),
            ]
        )
        inputs: dict[str, Any] = {
            "inputs_embeds": torch.cat([prompt, embeds.reshape(-1, hidden)]).unsqueeze(0),
            "position_ids": positions.unsqueeze(0),
            "use_cache": False,
        }
        pad = attention.key_padding(self.base_model, embeds.device, embeds.dtype, n + length)
        mask = attention.packed_mask(layout.attention_mask, n, pad, embeds.dtype)
        return layout, routing, inputs, attention.PackedPlan(n, batch_size, length, mask)

    def _cached_prompt_inputs(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        adapter_names: AdapterNames,
        labels: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        cache_key: str,
    ) -> tuple[Layout, Any, dict[str, Any], torch.Tensor | None]:
        """Layout (masks and positions for the full sequence), head routing, the base model's
        inputs for the user's tokens with a cache holding each row's prompt, and the last
        virtual token's logits where the loss needs them."""
        batch_size, length = embeds.shape[:2]
        names = self.resolve_adapters(adapter_names, batch_size)
        layout, routing = self.layout(None, attention_mask, names, batch_size, length)
        extra = attention.key_padding(
            self.base_model, embeds.device, embeds.dtype, layout.prompt_width + length
        )
        if extra and layout.perm is None:
            layout = _widened(layout, extra, self.position_style.pad_value)
        layout.prompt_cached = True
        with_logits = labels is not None and self.spec.prompt_logits
        cache, prompt_logits = self.prompt_cache_for(
            names, embeds.dtype, with_logits=with_logits, width=layout.prompt_width
        )
        inputs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": layout.attention_mask,
            "position_ids": layout.position_ids[:, layout.prompt_width :],
            cache_key: cache,
        }
        if token_type_ids is not None:
            inputs["token_type_ids"] = token_type_ids
        return layout, routing, inputs, prompt_logits

    def prompt_cache_for(
        self,
        names: list[str | None],
        dtype: torch.dtype,
        *,
        with_logits: bool = False,
        repeat: int = 1,
        width: int | None = None,
    ) -> tuple[Any, torch.Tensor | None]:
        """A transformers cache holding each row's prompt keys/values, right-aligned.

        The prompt KV of every adapter is computed once (with gradients when the prompt
        trains and grad is enabled, else remembered until the prompt changes).

        Args:
            names: Each row's adapter (None: no prompt), e.g. from `resolve_adapters`.
            dtype: The dtype of the inputs that will follow.
            with_logits: Also return the last virtual token's logits `(B, V)` (causal LM loss).
            repeat: Repeat each row this many times (beams, `num_return_sequences`).
            width: The cache's columns, at least `prompt_width(names)` (the default); columns
                on the left of a row's prompt hold zeros (mask them).

        Returns:
            The cache `(B * repeat, kv_heads, width, head_dim)` per layer, and the logits or
            None.
        """
        states = {n: self.prompt_kv.get(self, n, dtype, with_logits) for n in dict.fromkeys(names) if n}
        rows = [n for n in names for _ in range(repeat)]
        return batch_cache(self, states, rows, max(width or 0, self.prompt_width(names)))

    def clear_prompt_cache(self) -> None:
        """Forget the prompts' remembered keys/values (needed only after changing the base model)."""
        self.prompt_kv.clear()

    def _continue(
        self,
        embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        adapter_names: AdapterNames,
        cache: Any,
        cache_key: str,
        labels: torch.Tensor | None,
        kwargs: dict[str, Any],
        prompt_positions: PromptPositions = None,
    ) -> Any:
        """One step of a hand-written decoding loop: the cache already holds the prompt.

        `attention_mask` covers the user's tokens so far plus the new ones (as with the bare
        model); the prompt columns are added here and the prompt is not inserted again.
        `prompt_positions` (MARKER rows) are those of the first call.
        """
        if not self.spec.generative or introspect.is_encoder_decoder(self.base_model):
            raise ValueError("continuing from a cache is only supported for CAUSAL_LM models.")
        if labels is not None:
            raise ValueError("labels cannot be combined with a non-empty cache; run the full sequence.")
        if embeds is None:
            raise ValueError("forward needs input_ids or inputs_embeds for the new tokens.")
        batch_size, new = embeds.shape[:2]
        width = self.prompt_width(self.resolve_adapters(adapter_names, batch_size))
        past = cache.get_seq_length()
        user_len = past - width + new
        if attention_mask is not None and attention_mask.shape[1] != user_len:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; with {past} cached positions "
                f"({width} of them the prompt) and {new} new tokens it must cover the {user_len} user "
                "tokens so far (without the prompt), as for the bare model."
            )
        layout, _ = self.layout(None, attention_mask, adapter_names, batch_size, user_len, prompt_positions)
        inputs: dict[str, Any] = {
            "inputs_embeds": embeds,
            "attention_mask": layout.attention_mask,
            cache_key: cache,
        }
        if layout.position_ids is not None:
            inputs["position_ids"] = layout.position_ids[:, -new:]
        return self.base_model(**inputs, **kwargs)


def _widened(layout: Layout, extra: int, pad_value: int) -> Layout:
    """`layout` with `extra` more prompt columns on the left, masked (see
    `attention.key_padding`): every row's prompt then starts later, as a shorter prompt
    does in a batch of mixed prompts."""
    mask, positions = layout.attention_mask, layout.position_ids
    return dataclasses.replace(
        layout,
        attention_mask=torch.cat([mask.new_zeros(mask.shape[0], extra), mask], dim=1),
        position_ids=None
        if positions is None
        else torch.cat([positions.new_full((positions.shape[0], extra), pad_value), positions], dim=1),
        prompt_width=layout.prompt_width + extra,
    )


def plain_inputs(
    layout: Layout, token_type_ids: torch.Tensor | None, cache: Any, cache_key: str
) -> dict[str, Any]:
    """The base model's inputs for a laid-out batch with the prompt fed as embeddings."""
    inputs: dict[str, Any] = {"attention_mask": layout.attention_mask}
    if layout.inputs_embeds is not None:
        inputs["inputs_embeds"] = layout.inputs_embeds
    if layout.position_ids is not None:
        inputs["position_ids"] = layout.position_ids
    if token_type_ids is not None:
        inputs["token_type_ids"] = layout.extend(token_type_ids.to(layout.attention_mask.device), 0)
    if cache is not None:
        inputs[cache_key] = cache
    return inputs
