"""`SoftPromptModel`: a frozen transformers model plus any number of named soft prompts."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from softprompt.core import attention, introspect
from softprompt.core.adapter_files import load_adapter, plan_load, save_adapter
from softprompt.core.config import PromptPosition, PromptTuningConfig, TaskType
from softprompt.core.generation import generate
from softprompt.core.heads import HeadSwitch, find_module, routed
from softprompt.core.init import initial_prompt
from softprompt.core.layout import Layout, build_layout
from softprompt.core.losses import linear_output_layer
from softprompt.core.prefix import PromptKV, batch_cache, right_aligned, supports_prefix_cache
from softprompt.core.prompt import SoftPrompt
from softprompt.core.tasks import Call, task_spec

logger = logging.getLogger(__name__)

#: An `adapter_names` entry meaning "no prompt for this row" (the bare model).
BASE = "__base__"
#: One row's prompt: an adapter name, a tuple of names (their prompts concatenated in that
#: order), or None (no prompt).
RowPrompt = str | tuple[str, ...] | None
AdapterNames = list[str | tuple[str, ...] | None] | str | None
#: Per row, the user column before which a MARKER-placed prompt goes: `(B,)` or B ints.
PromptPositions = torch.Tensor | list[int] | tuple[int, ...] | None

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
            "(it becomes a module key and a folder name)."
        )
    return name


class SoftPromptModel(nn.Module):
    """A frozen base model that prepends learned virtual tokens to every input.

    Several prompts (adapters) can live on one model; `adapter_names` gives every row of
    a batch its own, prompts of different lengths included. Only the prompts (and, for
    classification/QA, the new task heads) are trainable.

    Per-token outputs (logits, hidden states, start/end logits) cover the user's tokens
    only, with the bare model's shapes: `logits[:, t]` predicts token `t + 1`. Pass
    `full_sequence=True` to get them for the prompt columns as well (PEFT's layout).

    Args:
        base_model: A transformers model (`...ForCausalLM`, `...ForSequenceClassification`...).
        config: The first adapter's configuration.
        adapter_name: Its name.
        tokenizer: Tokenizer for TEXT / CLASS_LABELS initialisation (else loaded from
            `config.tokenizer_name_or_path`) and for excluding special tokens from sampling.
        trainable: False freezes the prompt (inference only).
        init: Starting prompt values instead of the config's initialisation.
        prefix_cache: Compute each prompt's keys/values once instead of per example
            (causal decoders; see `softprompt.core.prefix`). Results are the same either way.
    """

    def __init__(
        self,
        base_model: nn.Module,
        config: PromptTuningConfig,
        adapter_name: str = "default",
        *,
        tokenizer: Any | None = None,
        trainable: bool = True,
        init: torch.Tensor | None = None,
        prefix_cache: bool = True,
    ) -> None:
        super().__init__()
        if not hasattr(base_model, "get_input_embeddings"):
            raise TypeError(
                f"base_model must be a transformers PreTrainedModel; got {type(base_model).__name__}."
            )
        if not isinstance(config, PromptTuningConfig):
            raise TypeError(f"config must be a PromptTuningConfig; got {type(config).__name__}.")
        task = config.task_type or introspect.infer_task_type(base_model)
        if task is None:
            raise ValueError(
                f"cannot tell the task of {type(base_model).__name__}; set task_type in the config "
                f"(one of {', '.join(TaskType.choices())})."
            )
        self.base_model = base_model
        self.task_type: TaskType = TaskType.parse(task, "task_type")
        self.spec = task_spec(self.task_type)
        self.spec.check_model(base_model)
        self.position_style = introspect.position_style(base_model)
        self.prompts = nn.ModuleDict()
        self.peft_config: dict[str, PromptTuningConfig] = {}
        self.heads: dict[str, HeadSwitch] = {}
        self.active_adapter: str | None = None
        self._disabled = False
        #: Start every forward/prefill from the prompts' precomputed KV where the model allows
        #: it (see `softprompt.core.prefix`); set False to always feed the prompt as embeddings.
        self.prefix_cache = prefix_cache
        self._prefix_supported = supports_prefix_cache(base_model)
        #: Each adapter's prompt keys/values, computed once and remembered for inference.
        self.prompt_kv = PromptKV()
        self._base_requires_grad = {n: p.requires_grad for n, p in base_model.named_parameters()}
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config, tokenizer=tokenizer, trainable=trainable, init=init)

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        """Names of the loaded adapters, in the order they were added."""
        return list(self.prompts.keys())

    @property
    def device(self) -> torch.device:
        """Where the base model's input embeddings (and so the prompts) live."""
        return self.base_model.get_input_embeddings().weight.device

    @property
    def config(self) -> Any:
        """The base model's transformers config."""
        return self.base_model.config

    def resolve_config(self, config: PromptTuningConfig) -> PromptTuningConfig:
        """A copy of `config` with the values derived from the base model filled in.

        Raises:
            ValueError: The config's task or token_dim does not fit this model.
        """
        if config.task_type is not None and config.task_type != self.task_type:
            raise ValueError(
                f"this model runs task {self.task_type.value}; an adapter for "
                f"{config.task_type.value} cannot be added to it."
            )
        info = introspect.describe_model(self.base_model)
        if config.token_dim is not None and config.token_dim != info["token_dim"]:
            raise ValueError(
                f"token_dim {config.token_dim} does not match the model's hidden size "
                f"{info['token_dim']}: the prompt was made for another model."
            )
        modules = config.modules_to_save
        if modules is None:
            modules = [n for n in self.spec.head_names if find_module(self.base_model, n) is not None]
        for name in modules:
            if find_module(self.base_model, name) is None:
                raise ValueError(
                    f"modules_to_save names {name!r}, which is not a module of "
                    f"{type(self.base_model).__name__}."
                )
        name_or_path = config.base_model_name_or_path or getattr(self.config, "_name_or_path", None) or None
        return config.replace(
            task_type=self.task_type,
            token_dim=info["token_dim"],
            num_layers=config.num_layers or info["num_layers"],
            num_attention_heads=config.num_attention_heads or info["num_attention_heads"],
            num_transformer_submodules=config.num_transformer_submodules
            or self.spec.num_transformer_submodules,
            modules_to_save=list(modules),
            base_model_name_or_path=name_or_path,
        )

    def add_adapter(
        self,
        adapter_name: str,
        config: PromptTuningConfig,
        *,
        tokenizer: Any | None = None,
        trainable: bool = True,
        init: torch.Tensor | None = None,
    ) -> None:
        """Add a new prompt (initialised as its config says) under `adapter_name`.

        Args:
            adapter_name: A new name.
            config: The prompt's configuration.
            tokenizer: See `SoftPromptModel`.
            trainable: Whether the prompt (and its heads) receive gradients.
            init: Starting values `(num_virtual_tokens * num_transformer_submodules, hidden)`
                instead of the config's initialisation.
        """
        _check_adapter_name(adapter_name)
        if adapter_name in self.prompts:
            raise ValueError(
                f"an adapter named {adapter_name!r} already exists; pick another name or "
                "delete_adapter it first."
            )
        resolved = self.resolve_config(config).replace(inference_mode=not trainable)
        embed = self.base_model.get_input_embeddings()
        if init is None:
            init = initial_prompt(resolved, embed, tokenizer, self.config)
        prompt = SoftPrompt(
            resolved.num_virtual_tokens, resolved.token_dim, resolved.num_transformer_submodules, init
        ).to(embed.weight.device)
        prompt.embedding.requires_grad_(trainable)
        for name in resolved.modules_to_save:
            self._head_switch(name).add(adapter_name, trainable)
        self.prompts[adapter_name] = prompt
        self.peft_config[adapter_name] = resolved
        self.prompt_kv.clear(adapter_name)
        if self.active_adapter is None:
            self.set_adapter(adapter_name)

    def _head_switch(self, name: str) -> HeadSwitch:
        if name in self.heads:
            return self.heads[name]
        parent, attr, module = find_module(self.base_model, name)
        switch = module if isinstance(module, HeadSwitch) else HeadSwitch(module)
        setattr(parent, attr, switch)
        self.heads[name] = switch
        return switch

    def set_adapter(self, adapter_name: str) -> None:
        """Make `adapter_name` the prompt used when `adapter_names` is not given."""
        self._require(adapter_name)
        self.active_adapter = adapter_name
        for switch in self.heads.values():
            switch.default_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter (its prompt and its head copies)."""
        self._require(adapter_name)
        if len(self.prompts) == 1:
            raise ValueError(f"{adapter_name!r} is the only adapter; a model needs at least one.")
        del self.prompts[adapter_name]
        del self.peft_config[adapter_name]
        self.prompt_kv.clear(adapter_name)
        for switch in self.heads.values():
            switch.remove(adapter_name)
        if self.active_adapter == adapter_name:
            self.set_adapter(self.adapter_names[0])

    def _require(self, adapter_name: str) -> None:
        if adapter_name not in self.prompts:
            raise KeyError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapter_names}.")

    def get_prompt(self, adapter_name: str | None = None) -> torch.Tensor:
        """The virtual tokens of an adapter, `(num_virtual_tokens, hidden)` float32."""
        name = adapter_name or self.active_adapter
        self._require(name)
        return self.prompts[name]()

    def head_modules(self, adapter_name: str) -> dict[str, nn.Module]:
        """The head copies trained with `adapter_name`, by module path."""
        return {
            path: switch.copies[adapter_name]
            for path, switch in self.heads.items()
            if adapter_name in switch.copies
        }

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that receive gradients: prompts and trained heads."""
        return [p for p in self.parameters() if p.requires_grad]

    def unload(self) -> nn.Module:
        """Give the base model back as it was: heads restored, requires_grad restored."""
        for name, switch in self.heads.items():
            parent, attr, _ = find_module(self.base_model, name)
            setattr(parent, attr, switch.original)
        self.heads = {}
        for n, p in self.base_model.named_parameters():
            p.requires_grad_(self._base_requires_grad.get(n, p.requires_grad))
        return self.base_model

    # ------------------------------------------------------------------ batching
    def embed(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The input embeddings `(B, L, H)` for `input_ids` `(B, L)` (or `inputs_embeds` as given).

        Raises:
            ValueError: Both were given.
        """
        if input_ids is not None and inputs_embeds is not None:
            raise ValueError("pass either input_ids or inputs_embeds, not both.")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids is None:
            return None
        embed = self.base_model.get_input_embeddings()
        return embed(input_ids.to(embed.weight.device))

    def resolve_adapters(self, adapter_names: AdapterNames, batch_size: int) -> list[RowPrompt]:
        """Each row's prompt, from `adapter_names` as `forward` takes it: an adapter name, a
        tuple of two or more names (a combination; a 1-tuple becomes the name, an empty
        tuple None), or None (no prompt).

        Raises:
            ValueError: The number of entries does not match `batch_size`, or a combination
                holds something other than loaded adapter names.
            KeyError: A name is not loaded.
        """
        if self._disabled:
            return [None] * batch_size
        if adapter_names is None:
            return [self.active_adapter] * batch_size
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * batch_size
        names = [_row_prompt(n) for n in adapter_names]
        if len(names) != batch_size:
            raise ValueError(
                f"adapter_names has {len(names)} entries but the batch has {batch_size} rows; "
                "give one adapter name per row."
            )
        for n in dict.fromkeys(names):
            for part in (n,) if isinstance(n, str) else n or ():
                self._require(part)
            if isinstance(n, tuple):
                placements = {self.peft_config[part].prompt_position for part in n}
                if len(placements) > 1:
                    raise ValueError(
                        f"the combination {n!r} mixes prompt placements "
                        f"({', '.join(sorted(p.value for p in placements))}); the prompts of one row "
                        "are concatenated into one block, so they must share a prompt_position."
                    )
        return names

    def prompt_length(self, row: RowPrompt) -> int:
        """The virtual tokens of one row's prompt (a combination: the sum; None: 0)."""
        if row is None:
            return 0
        if isinstance(row, str):
            return self.prompts[row].num_virtual_tokens
        return sum(self.prompts[n].num_virtual_tokens for n in row)

    def prompt_width(self, names: list[RowPrompt]) -> int:
        """The longest prompt among rows `names` (0 when no row has one): the columns the
        prompts take in front of the user's tokens."""
        return max((self.prompt_length(n) for n in names if n is not None), default=0)

    def placement(self, row: RowPrompt) -> PromptPosition:
        """Where one row's prompt goes (see `PromptTuningConfig.prompt_position`)."""
        if row is None:
            return PromptPosition.PREFIX
        first = row if isinstance(row, str) else row[0]
        return self.peft_config[first].prompt_position

    def _head_adapter(self, row: RowPrompt) -> str | None:
        """The adapter whose heads a row uses: for a combination, the last one that has
        head copies (the task prompt goes last, e.g. `("domain", "task")`)."""
        if not isinstance(row, tuple):
            return row
        with_heads = [n for n in row if any(n in switch.copies for switch in self.heads.values())]
        return with_heads[-1] if with_heads else row[-1]

    def _row_prompt_tensor(
        self, row: RowPrompt, dtype: torch.dtype, device: torch.device, hidden: int
    ) -> torch.Tensor:
        """One row's prompt `(N, H)`: an adapter's, a combination's prompts one after the
        other, or `(0, H)`."""
        if row is None:
            return torch.zeros(0, hidden, dtype=dtype, device=device)
        if isinstance(row, str):
            return self.prompts[row](dtype).to(device)
        return torch.cat([self.prompts[n](dtype).to(device) for n in row], dim=0)

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run the bare base model (no prompt, base heads) inside this block, with the same
        exact handling of padding. Rows can also opt out one by one with `adapter_names`
        entries equal to `softprompt.BASE` or None."""
        previous, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = previous

    def prompt_batch(
        self,
        adapter_names: AdapterNames,
        batch_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str | None, torch.Tensor | None]]]:
        """Every row's prompt (a combination's prompts concatenated), right-aligned.

        Returns:
            prompts `(B, P, H)` in `dtype` (P = longest prompt in the batch), prompt mask
            `(B, P)` (0 on the left of shorter prompts and for rows without a prompt), and
            the row routing for heads.
        """
        names = self.resolve_adapters(adapter_names, batch_size)
        unique = list(dict.fromkeys(names))
        hidden = introspect.hidden_size(self.base_model)
        if len(unique) == 1:
            if unique[0] is None:
                prompts = torch.zeros(batch_size, 0, hidden, dtype=dtype, device=device)
            else:
                p = self._row_prompt_tensor(unique[0], dtype, device, hidden)  # (N, H)
                prompts = p.unsqueeze(0).expand(batch_size, -1, -1)
            mask = torch.ones(batch_size, prompts.shape[1], dtype=torch.long, device=device)
            return prompts, mask, [(self._head_adapter(unique[0]), None)]
        width = self.prompt_width(names)
        table = [self._row_prompt_tensor(u, dtype, device, hidden) for u in unique]
        which = torch.tensor([unique.index(n) for n in names], device=device)
        prompts = right_aligned(table, which, width, dim=0)  # (B, P, H)
        lengths = torch.tensor([self.prompt_length(n) for n in names], device=device)
        mask = (torch.arange(width, device=device).unsqueeze(0) >= (width - lengths).unsqueeze(1)).long()
        heads = [self._head_adapter(n) for n in names]
        routing = [
            (h, torch.tensor([i for i, n in enumerate(heads) if n == h], device=device))
            for h in dict.fromkeys(heads)
        ]
        return prompts, mask, routing

    def layout(
        self,
        embeds: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        adapter_names: AdapterNames,
        batch_size: int,
        user_len: int,
        prompt_positions: PromptPositions = None,
    ) -> tuple[Layout, list[tuple[str, torch.Tensor | None]]]:
        """Lay out a batch (see `softprompt.core.layout`); `embeds` None lays out masks only.

        `prompt_positions` places the prompts of MARKER rows (see `insert_positions`)."""
        device = embeds.device if embeds is not None else self.device
        dtype = embeds.dtype if embeds is not None else self.base_model.get_input_embeddings().weight.dtype
        prompts, prompt_mask, routing = self.prompt_batch(adapter_names, batch_size, dtype, device)
        if attention_mask is None:
            attention_mask = torch.ones(batch_size, user_len, dtype=torch.long, device=device)
        elif tuple(attention_mask.shape) != (batch_size, user_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but the inputs are "
                f"({batch_size}, {user_len}); give one mask value per input token."
            )
        insert_at = self.insert_positions(adapter_names, batch_size, user_len, prompt_positions, device)
        layout = build_layout(
            self.position_style,
            prompt_mask,
            attention_mask.to(device),
            prompts if embeds is not None else None,
            embeds,
            insert_at,
        )
        return layout, routing

    def insert_positions(
        self,
        adapter_names: AdapterNames,
        batch_size: int,
        user_len: int,
        prompt_positions: PromptPositions,
        device: torch.device | None = None,
    ) -> torch.Tensor | None:
        """Per row, the user column before which its prompt goes, `(B,)` long; None when
        every prompt is a prefix.

        Rows whose prompt is placed at a marker (`prompt_position="MARKER"`) take their
        entry of `prompt_positions`; every other row keeps its prompt in front (its entry
        is not used), so a PEFT adapter stays a prefix in any batch.

        Raises:
            ValueError: A MARKER row without `prompt_positions`, or positions of the wrong
                shape or outside `0..user_len`.
        """
        names = self.resolve_adapters(adapter_names, batch_size)
        marker = [self.placement(n) is PromptPosition.MARKER for n in names]
        positions = None
        if prompt_positions is not None:
            positions = torch.as_tensor(prompt_positions, device=device)
            if positions.dtype.is_floating_point or positions.dtype == torch.bool:
                raise TypeError(f"prompt_positions must hold integers; got dtype {positions.dtype}.")
            if tuple(positions.shape) != (batch_size,):
                raise ValueError(
                    f"prompt_positions has shape {tuple(positions.shape)}; give one index per row, "
                    f"shape ({batch_size},)."
                )
            if positions.numel() and not bool(((positions >= 0) & (positions <= user_len)).all()):
                raise ValueError(
                    f"prompt_positions {positions.tolist()} must lie in 0..{user_len}: the index of "
                    f"the input column before which the prompt goes ({user_len}: after the last)."
                )
        if not any(marker):
            return None
        if positions is None:
            row = names[marker.index(True)]
            raise ValueError(
                f"adapter {row!r} is placed at a marker (prompt_position='MARKER'): pass "
                "prompt_positions, per row the input column before which the prompt goes "
                "(softprompt.scoring.compose.tokenize_template gives them for a template with {prompt})."
            )
        rows = torch.tensor(marker, device=positions.device)
        insert_at = torch.where(rows, positions.long(), 0)
        return insert_at if bool(insert_at.any()) else None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        adapter_names: AdapterNames = None,
        prompt_positions: PromptPositions = None,
        token_type_ids: torch.Tensor | None = None,
        full_sequence: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
        return_logits: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with each row's prompt in front of its tokens (or at its marker).

        Args:
            input_ids: `(B, L)` token ids (or `inputs_embeds` `(B, L, H)`).
            attention_mask: `(B, L)` the usual padding mask, left or right padding.
            labels: As for the bare model: `(B, L)` for causal LM / token classification
                (-100 ignored; labels at padded positions are ignored too), `(B,)` for
                sequence classification, decoder labels for seq2seq.
            adapter_names: One adapter for the whole batch, or one entry per row: a name, a
                tuple of names (their prompts concatenated in that order), or
                `softprompt.BASE` / None (no prompt).
            prompt_positions: `(B,)` for rows whose adapters are placed at a marker
                (`prompt_position="MARKER"`): the index of the input column before which
                the prompt goes (`L`: after the last). Other rows keep a prefix.
            token_type_ids: `(B, L)`; the prompt gets segment 0.
            full_sequence: Return per-token outputs for the prompt columns too.
            num_items_in_batch: Token-loss normaliser for gradient accumulation.
            return_logits: False when only the loss is needed (training with `labels`): a
                causal LM whose output layer is a plain linear map then computes the loss
                block by block from the last hidden states, without the `(B, L, vocab)`
                logits (most of the loss's memory traffic for a large vocabulary), and
                returns `logits=None`. The loss and gradients are the default path's up to
                rounding. Other tasks, calls without labels, and output layers that do more
                than a linear map (soft-capping, scaling) return logits as usual.
            **kwargs: Passed to the base model (`output_hidden_states`, `decoder_input_ids`,
                `start_positions`/`end_positions` for QA, a `cache` to continue from...).

        Returns:
            The base model's output object, with loss and per-token outputs as described
            in the class docstring.
        """
        cache_key = introspect.cache_kwarg(self.base_model)
        cache = kwargs.pop("cache", None)
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        extra = {k: kwargs.pop(k) for k in self.spec.extra_inputs if k in kwargs}
        embeds = self.embed(input_ids, inputs_embeds)
        encoder_outputs = kwargs.get("encoder_outputs")
        if embeds is None and encoder_outputs is None:
            raise ValueError("forward needs input_ids or inputs_embeds.")
        if embeds is not None:
            batch_size, length = embeds.shape[:2]
        else:
            batch_size, length = attention_mask.shape

        past = cache.get_seq_length() if cache is not None else 0
        if past:
            return self._continue(
                embeds, attention_mask, adapter_names, cache, cache_key, labels, kwargs, prompt_positions
            )

        plan = None
        if (
            cache is None
            and encoder_outputs is None
            and not full_sequence
            and self.uses_prompt_cache(adapter_names, batch_size, prompt_positions)
        ):
            prompt_logits = None
            names = self.resolve_adapters(adapter_names, batch_size)
            if self._packs(names, labels, return_logits, token_type_ids, kwargs):
                layout, routing, inputs, plan = self._packed_inputs(embeds, attention_mask, names)
            else:
                layout, routing, inputs, prompt_logits = self._cached_prompt_inputs(
                    embeds, attention_mask, adapter_names, labels, token_type_ids, cache_key
                )
        else:
            prompt_logits = None
            layout, routing = self.layout(
                embeds if encoder_outputs is None else None,
                attention_mask,
                adapter_names,
                batch_size,
                length,
                prompt_positions,
            )
            inputs = _plain_inputs(layout, token_type_ids, cache, cache_key)
        inputs.update(kwargs)
        call = Call(
            self.base_model,
            layout,
            inputs,
            labels,
            extra,
            full_sequence,
            num_items_in_batch,
            prompt_logits,
            return_logits,
            plan.prompt if plan is not None else 0,
        )
        if plan is not None:
            attend = attention.packed(self.base_model, plan)
        else:
            attn = (
                attention.prefix_attention(self.base_model, embeds.device) if layout.prompt_cached else None
            )
            attend = attention.attention_implementation(self.base_model, attn)
        with routed(list(self.heads.values()), routing), attend:
            return self.spec.forward(call)

    # ------------------------------------------------------------------ prompt KV cache
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

    # ------------------------------------------------------------------ generation
    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Generate through the prompt; see `softprompt.core.generation.generate`."""

        return generate(self, *args, **kwargs)

    # ------------------------------------------------------------------ files
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        selected_adapters: list[str] | None = None,
        *,
        overwrite: bool = False,
    ) -> None:
        """Write adapters in PEFT's format (see `softprompt.core.adapter_files.save_adapter`).

        The adapter named "default" (or the only one selected) goes into `save_directory`
        itself, every other adapter into `save_directory/<name>`, as PEFT does.
        """

        names = selected_adapters or self.adapter_names
        for n in names:
            self._require(n)
        for n in names:
            sub = save_directory if (n == "default" or len(names) == 1) else os.path.join(save_directory, n)
            save_adapter(self, n, sub, overwrite=overwrite)

    def load_adapter(
        self,
        path: str | os.PathLike,
        adapter_name: str,
        *,
        trainable: bool = False,
        allow_base_mismatch: bool = False,
    ) -> None:
        """Load an adapter folder (ours or PEFT's) under a new name.

        Args:
            allow_base_mismatch: Load an adapter saved from a different base model of the
                same width (refused by default, see `adapter_files.base_fingerprint`).
        """

        load_adapter(self, path, adapter_name, trainable=trainable, allow_base_mismatch=allow_base_mismatch)

    @classmethod
    def from_pretrained(
        cls,
        base_model: nn.Module,
        path: str | os.PathLike,
        adapter_name: str = "default",
        *,
        trainable: bool = False,
        allow_base_mismatch: bool = False,
    ) -> SoftPromptModel:
        """Wrap `base_model` with the adapter saved in `path`.

        Args:
            trainable: True resumes training the loaded prompt (PEFT refuses this).
            allow_base_mismatch: Load an adapter saved from a different base model of the
                same width (refused by default, see `adapter_files.base_fingerprint`).
        """

        # checked before touching base_model
        plan = plan_load(path, base_model, allow_base_mismatch=allow_base_mismatch)
        model = cls(base_model, plan.config, adapter_name, trainable=trainable, init=plan.prompt)
        plan.apply_heads(model, adapter_name)
        return model


def _row_prompt(entry: Any) -> RowPrompt:
    """One `adapter_names` entry as a row prompt: BASE/None -> None, a 1-tuple -> its name."""
    if entry is None or entry == BASE:
        return None
    if isinstance(entry, (tuple, list)):
        parts = tuple(entry)
        if not all(isinstance(p, str) and p != BASE for p in parts):
            raise ValueError(
                f"a combination of prompts must list adapter names; got {entry!r} "
                "(use BASE or None alone for a row without a prompt)."
            )
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else parts
    return entry


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


def _plain_inputs(
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
