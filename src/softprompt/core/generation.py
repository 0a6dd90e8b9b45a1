"""Generation through soft prompts, with transformers' own decoding loop and KV cache.

The prompt is laid out once, in front of the user's tokens, and handed to
`base_model.generate` as `inputs_embeds` for the first (prefill) step only; every later
step feeds the newly generated token alone and reuses the cache, so the prompt is never
inserted twice. Position ids are given explicitly (counting attended columns), which
keeps left-padded batches and absolute-position models such as GPT-2 exact.

Prompts placed at a marker inside the input (`prompt_positions`) and combinations of
prompts are laid out the same way and run without the prompts' cached KV (the prefill
processes prompt and input together); prefixes of single adapters start from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from softprompt.core import introspect

if TYPE_CHECKING:
    from softprompt.core.model import SoftPromptModel


def generate(
    model: SoftPromptModel,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    *,
    adapter_names: list[str | tuple[str, ...] | None] | str | None = None,
    prompt_positions: torch.Tensor | list[int] | None = None,
    **kwargs: Any,
) -> Any:
    """Generate with each row's prompt in front of its input (or at its marker).

    Args:
        model: A CAUSAL_LM or SEQ_2_SEQ_LM `SoftPromptModel`.
        input_ids: `(B, L)`; decoder-only batches should be left-padded, as for the bare model.
        attention_mask: `(B, L)`.
        inputs_embeds: `(B, L, H)` instead of `input_ids`.
        adapter_names: One adapter for all rows or one entry per row (a name, a tuple of
            names whose prompts are concatenated, or `softprompt.BASE`).
        prompt_positions: `(B,)` for rows whose adapters are placed at a marker: the input
            column before which the prompt goes (see `SoftPromptModel.forward`).
        **kwargs: Anything `transformers`' `generate` takes (`max_new_tokens`, `do_sample`,
            `temperature`, `num_beams`, `generation_config`...).

    Returns:
        What `generate` returns. For decoder-only models given `input_ids`, sequences are
        `[input_ids, new tokens]` as for the bare model; given only `inputs_embeds`, the new
        tokens alone. Virtual tokens never appear in the output.
    """
    if not model.spec.generative:
        raise ValueError(
            f"generate needs a CAUSAL_LM or SEQ_2_SEQ_LM model; this one does {model.task_type.value}."
        )
    if input_ids is None and inputs_embeds is None:
        raise ValueError("generate needs input_ids or inputs_embeds.")
    for key in ("cache", "past_key_values", "position_ids"):
        if kwargs.get(key) is not None:
            raise ValueError(f"{key} cannot be passed to generate; softprompt builds it for the prompt.")
    embeds = model.embed(input_ids, inputs_embeds)
    batch_size, length = embeds.shape[:2]
    layout, _ = model.layout(embeds, attention_mask, adapter_names, batch_size, length, prompt_positions)
    base = model.base_model
    gen: dict[str, Any] = {"inputs_embeds": layout.inputs_embeds, "attention_mask": layout.attention_mask}
    if not introspect.is_encoder_decoder(base):
        if layout.position_ids is not None:
            gen["position_ids"] = layout.position_ids
        if input_ids is not None:
            gen["input_ids"] = input_ids.to(embeds.device)
        if model.uses_prompt_cache(adapter_names, batch_size, prompt_positions):
            # Start from the prompts' cached KV: the prefill then runs on the user's tokens only
            # (generate skips the columns the cache already holds).
            gen[introspect.cache_kwarg(base)] = _prompt_cache(
                model, adapter_names, batch_size, embeds.dtype, kwargs
            )
    return base.generate(**gen, **kwargs)


def _prompt_cache(
    model: SoftPromptModel, adapter_names: Any, batch_size: int, dtype: torch.dtype, kwargs: dict[str, Any]
) -> Any:
    """A cache with every row's prompt KV, repeated for beams / multiple return sequences."""
    config = kwargs.get("generation_config") or model.base_model.generation_config
    expand = max(
        int(kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1),
        int(kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1),
    )
    names = model.resolve_adapters(adapter_names, batch_size)
    with torch.no_grad():
        cache, _ = model.prompt_cache_for(names, dtype, repeat=expand)
    return cache
