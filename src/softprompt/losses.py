"""Token losses: a memory-frugal summed cross-entropy and the mean over target tokens.

Every task that scores tokens (causal LM, token classification) computes its loss here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class SummedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `(N, V)` logits against `(N,)` targets (-100: ignored),
    computed in float32 (float64 for float64 logits).

    Same value and gradient as `F.cross_entropy(logits.float(), targets, reduction="sum")`,
    but it never allocates a full `(N, V)` tensor besides the gradient itself: the forward
    keeps one log-normaliser per row and the logits (which the caller returns anyway), the
    backward writes `softmax - one_hot` block by block. PyTorch's version allocates three
    more `(N, V)` tensors (log-probabilities, a zero-filled gradient, its product), which for
    a 49k-token vocabulary is most of the loss's time and memory.
    """

    BLOCK_BYTES = 8 << 20  # small enough for the allocator to reuse the blocks' memory

    @staticmethod
    def _blocks(logits: torch.Tensor) -> list[slice]:
        rows = max(1, SummedCrossEntropy.BLOCK_BYTES // (4 * max(1, logits.shape[1])))
        return [slice(i, i + rows) for i in range(0, logits.shape[0], rows)]

    @staticmethod
    def forward(ctx: Any, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(logits.dtype, torch.float32)
        lse = logits.new_empty(logits.shape[0], dtype=work)
        for rows in SummedCrossEntropy._blocks(logits):
            lse[rows] = torch.logsumexp(logits[rows].to(work), dim=-1)
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        picked = logits.gather(1, safe[:, None]).squeeze(1).to(work)
        ctx.save_for_backward(logits, lse, safe, valid)
        return ((lse - picked) * valid).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, lse, safe, valid = ctx.saved_tensors
        scale = grad.to(lse.dtype) * valid  # per row; 0 where the target is ignored
        out = torch.empty_like(logits)
        in_place = out.dtype == lse.dtype  # else each block goes through the working dtype
        for rows in SummedCrossEntropy._blocks(logits):
            # softmax * scale - one_hot * scale
            block = torch.sub(
                logits[rows].to(lse.dtype), lse[rows, None], out=out[rows] if in_place else None
            )
            block.exp_().mul_(scale[rows, None])
            block[torch.arange(block.shape[0], device=block.device), safe[rows]] -= scale[rows]
            if not in_place:
                out[rows] = block
        return out, None


def token_cross_entropy(
    pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], num_items_in_batch: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy over targets that are not -100.

    `pieces` are `(logits, targets)` pairs counted as one set of tokens, so logits that
    come in parts are never concatenated (a copy of a `(B, L, vocab)` tensor).
    """
    total, count = None, None
    for logits, targets in pieces:
        logits = logits.reshape(-1, logits.shape[-1])
        targets = targets.reshape(-1).to(logits.device)
        part = SummedCrossEntropy.apply(logits, targets)
        valid = (targets != -100).sum()
        total, count = (part, valid) if total is None else (total + part, count + valid)
    if num_items_in_batch is not None:
        count = (
            num_items_in_batch.to(total.device)
            if isinstance(num_items_in_batch, torch.Tensor)
            else num_items_in_batch
        )
    return total / count
