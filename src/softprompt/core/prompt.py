"""The soft prompt itself: a float32 matrix of virtual-token embeddings."""

from __future__ import annotations

import torch
from torch import nn


class SoftPrompt(nn.Module):
    """Learned virtual tokens of one adapter.

    The matrix has `num_virtual_tokens * num_transformer_submodules` rows, as PEFT stores
    it; prompt tuning reads only the first `num_virtual_tokens` rows (for encoder-decoder
    models PEFT keeps a second, unused block, which is kept here so files stay
    interchangeable). The parameter stays float32 whatever the base model's dtype and is
    cast when it is used, so small updates are not lost to bf16/fp16 rounding.

    Args:
        num_virtual_tokens: N, the prompt length.
        token_dim: Hidden size of the model's input embeddings.
        num_transformer_submodules: 1, or 2 for PEFT's encoder-decoder layout.
        init: Optional starting values, `(N * num_transformer_submodules, token_dim)`.
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        token_dim: int,
        num_transformer_submodules: int = 1,
        init: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        rows = num_virtual_tokens * num_transformer_submodules
        if init is None:
            init = torch.zeros(rows, token_dim)
        if tuple(init.shape) != (rows, token_dim):
            raise ValueError(f"initial prompt has shape {tuple(init.shape)}, expected ({rows}, {token_dim})")
        self.embedding = nn.Parameter(init.detach().to(torch.float32).clone())

    @property
    def token_dim(self) -> int:
        return int(self.embedding.shape[1])

    def forward(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The virtual tokens fed to the model, `(num_virtual_tokens, token_dim)`, cast to `dtype`."""
        rows = self.embedding[: self.num_virtual_tokens]
        return rows if dtype is None else rows.to(dtype)

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}, token_dim={self.token_dim}"
