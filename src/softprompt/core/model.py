"""`SoftPromptModel`: a frozen transformers model plus any number of named soft prompts."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

import torch
from torch import nn

from softprompt.core import attention, introspect
from softprompt.core.adapter_files import load_adapter, plan_load, save_adapter
from softprompt.core.cached_prompts import CachedPrompts, plain_inputs
from softprompt.core.config import PromptTuningConfig, TaskType
from softprompt.core.generation import generate
from softprompt.core.heads import HeadSwitch, find_module, routed
from softprompt.core.init import initial_prompt
from softprompt.core.prefix import PromptKV, supports_prefix_cache
from softprompt.core.prompt import SoftPrompt
from softprompt.core.rows import BASE, AdapterNames, PromptPositions, RowPrompt  # noqa: F401  (BASE, RowPrompt: re-exported)
from softprompt.core.tasks import Call, task_spec

logger = logging.getLogger(__name__)

_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def _check_adapter_name(name: Any) -> str:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-' "
            "(it becomes a module key and a folder name)."
        )
    return name


class SoftPromptModel(CachedPrompts, nn.Module):
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
            inputs = plain_inputs(layout, token_type_ids, cache, cache_key)
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
