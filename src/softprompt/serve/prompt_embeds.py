"""Prompt embeddings for engines that take them (vLLM's `prompt_embeds`), offline.

A soft prompt in front of a text is, for the model, the rows `[prompt; embeddings of the
text's tokens]`. `PromptEmbedder` builds them from the tokenizer and the input-embedding
table alone (the rest of the model is never read), so a batch job can hand them to
`vllm.LLM` (started with `enable_prompt_embeds=True`) in the process or on the machine that
runs vLLM:

    from softprompt.serve.prompt_embeds import PromptEmbedder
    embedder = PromptEmbedder(None, {"sst": "runs/sst/best"})      # None: the default model
    rows = embedder.embeds("sst", ["Review: great.\\nSentiment:", "Review: dull.\\nSentiment:"])
    outputs = llm.generate([{"prompt_embeds": r} for r in rows], SamplingParams(max_tokens=8))

The server's vLLM engine (`softprompt serve --engine vllm`) builds the same rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from softprompt.core.config import PromptPosition, PromptTuningConfig
from softprompt.core.model import SoftPromptModel
from softprompt.serve.vllm_engine import embeddings_only_model


class PromptEmbedder:
    """Tokenizer, input embeddings and adapters of one base model; see the module docstring.

    Args:
        model: A model id or folder, None for the packaged default (its input embeddings and
            tokenizer only are loaded).
        adapters: Adapter name -> folder (ours or PEFT's).
        dtype: The embeddings' dtype (vLLM casts them to the model's).
        allow_base_mismatch: Load adapters saved from another base model of the same width.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        adapters: dict[str, str | os.PathLike] | None = None,
        *,
        dtype: torch.dtype = torch.float32,
        allow_base_mismatch: bool = False,
    ) -> None:

        base, self.tokenizer = embeddings_only_model(None if model is None else str(model), dtype)
        placeholder = "_embedder_placeholder_"
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1)
        self.model = SoftPromptModel(base, config, placeholder, trainable=False).eval()
        self.table = base.get_input_embeddings().weight.detach()
        for name, path in (adapters or {}).items():
            self.model.load_adapter(path, name, allow_base_mismatch=allow_base_mismatch)
        if adapters:
            self.model.delete_adapter(placeholder)

    @property
    def adapters(self) -> list[str]:
        return list(self.model.adapter_names)

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def embeds(self, adapter: str | None, texts: Sequence[str | Sequence[int]]) -> list[torch.Tensor]:
        """`[adapter's prompt; token embeddings]` for each text (or list of token ids), each
        `(prompt + tokens, hidden)`; `adapter` None gives the token embeddings alone.

        Raises:
            ValueError: An unknown adapter, an adapter placed at a {prompt} marker, or an
                empty text.
        """

        prompt = self.table[:0]
        if adapter is not None:
            if adapter not in self.model.prompts:
                raise ValueError(f"no adapter {adapter!r}; loaded: {self.adapters}.")
            if self.model.peft_config[adapter].prompt_position == PromptPosition.MARKER:
                raise ValueError(f"adapter {adapter!r} is placed at a {{prompt}} marker, not in front.")
            with torch.no_grad():
                prompt = self.model.prompts[adapter](self.table.dtype)
        out = []
        for text in texts:
            ids = self.token_ids(text) if isinstance(text, str) else list(text)
            if not ids:
                raise ValueError(f"text {text!r} has no tokens.")
            out.append(torch.cat([prompt, self.table[torch.tensor(ids, dtype=torch.long)]], dim=0))
        return out

    def vllm_inputs(self, adapter: str | None, texts: Sequence[str | Sequence[int]]) -> list[dict[str, Any]]:
        """`[{"prompt_embeds": rows}, ...]`, what `vllm.LLM.generate` takes."""
        return [{"prompt_embeds": rows} for rows in self.embeds(adapter, texts)]


__all__ = ["PromptEmbedder"]
