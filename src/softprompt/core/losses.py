"""Token losses: a memory-frugal summed cross-entropy, one fused with the output layer
(the logits are never materialised), and the mean over target tokens.

Every task that scores tokens (causal LM, token classification) computes its loss here.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from softprompt.core.prefix import backbone


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


@dataclass(frozen=True)
class Projected:
    """Logits not computed yet: `hidden @ weight.T + bias` (a linear output layer's), for
    `token_cross_entropy` to score block by block.

    Attributes:
        hidden: `(..., H)` the output layer's input.
        weight: `(V, H)` its weight (frozen).
        bias: `(V,)` or None.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None


class LinearCrossEntropy(torch.autograd.Function):
    """`scale *` the summed cross-entropy of the logits `hidden @ weight.T + bias` `(N, V)`
    against `(N,)` targets (-100: ignored), without ever holding the `(N, V)` logits.

    The same value and gradient (up to rounding) as `SummedCrossEntropy` of the output
    layer's logits times `scale`, for a frozen output layer: block by block of rows, the
    logits are computed, scored and, when `hidden` needs a gradient, turned at once into
    that gradient (`(softmax - one_hot) * scale @ weight`): the loss ends the graph, so
    the backward only multiplies it by the incoming gradient (1 for `loss.backward()`).
    The plain path writes the logits, re-reads them for the normaliser, writes a gradient
    of the same size and re-reads it for the output layer's backward: for a 49k-token
    vocabulary, hundreds of MB per batch, each freshly allocated.

    The logits are computed in the dtype the output layer would give (autocast's where
    autocast is on), the softmax in float32 (float64 for float64 logits), as in
    `SummedCrossEntropy`.
    """

    BLOCK_BYTES = 96 << 20  # one block's float32 logits; the weight is read twice per block
    MIN_ROWS = 64

    @staticmethod
    def _rows(n: int, vocab: int) -> int:
        rows = LinearCrossEntropy.BLOCK_BYTES // (4 * max(1, vocab))
        return max(1, min(n, max(rows, LinearCrossEntropy.MIN_ROWS)))

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        work = torch.promote_types(dtype, torch.float32)
        need_grad = ctx.needs_input_grad[0]
        # cast once here rather than once per block (what autocast would do on every call)
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        valid = targets != -100
        safe = torch.where(valid, targets, 0)
        row_scale = valid.to(work) * scale.to(work)  # (N,) 0 where the target is ignored
        n, vocab = h.shape[0], w.shape[0]
        step = LinearCrossEntropy._rows(n, vocab)
        buffer = h.new_empty(min(step, n), vocab)
        grad = torch.empty_like(hidden) if need_grad else None
        total = torch.zeros((), dtype=work, device=hidden.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, n, step):
                rows = slice(start, min(start + step, n))
                count = rows.stop - rows.start
                logits = torch.mm(h[rows], w.t(), out=buffer[:count])  # (n_rows, V)
                if b is not None:
                    logits.add_(b)
                scores = logits.to(work)  # the same tensor when dtype is already `work`
                picked = scores.gather(1, safe[rows, None]).squeeze(1)
                # logsumexp as torch computes it (max + log(sum(exp(x - max)))), in place
                top = scores.amax(dim=1, keepdim=True)
                top.masked_fill_(torch.isinf(top), 0)
                exp = scores.sub_(top).exp_()
                sums = exp.sum(dim=1)
                lse = sums.log() + top.squeeze(1)
                total += ((lse - picked) * row_scale[rows]).sum()
                if need_grad:
                    # (softmax - one_hot) * scale, in place
                    block = exp.mul_((row_scale[rows] / sums)[:, None])
                    block[torch.arange(count, device=block.device), safe[rows]] -= row_scale[rows]
                    grad[rows] = torch.mm(block.to(dtype), w)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None, None]:
        (grad,) = ctx.saved_tensors
        if grad is None:
            return None, None, None, None, None
        return grad * grad_output.to(grad.dtype), None, None, None, None


# per model: (output layer, its weight, whether the logits are that layer's)
_HEAD_CHECKS: weakref.WeakKeyDictionary[nn.Module, tuple[nn.Module, torch.Tensor, bool]] = (
    weakref.WeakKeyDictionary()
)


def linear_output_layer(base: nn.Module) -> nn.Linear | None:
    """The frozen `nn.Linear` output layer of a causal LM whose logits are exactly that layer
    applied to its body's last hidden state, or None (then only the model computes logits).

    Checked once per model and output layer by running both on a few tokens: the logits
    must be bit-identical, which rules out what some models do after the output layer
    (Gemma-2's soft-capping, Cohere's and Granite's logit scaling...) whatever its name.
    """

    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return None
    if hasattr(head.weight, "ds_id"):  # DeepSpeed ZeRO-3: outside its forward the weight is a placeholder
        return None
    if head.bias is not None and head.bias.requires_grad:
        return None
    body = backbone(base)
    if body is base:
        return None
    known = _HEAD_CHECKS.get(base)
    if known is None or known[0] is not head or known[1] is not head.weight:
        known = (head, head.weight, _same_logits(base, body, head))
        _HEAD_CHECKS[base] = known
    return head if known[2] else None


def _same_logits(base: nn.Module, body: nn.Module, head: nn.Linear) -> bool:
    """Whether `base`'s logits equal `head(body(...).last_hidden_state)` for a few tokens
    (in eval mode: dropout off; every module's mode is restored)."""
    modes = [(m, m.training) for m in base.modules()]
    vocab = head.weight.shape[0]
    ids = torch.arange(min(4, vocab), device=head.weight.device).unsqueeze(0)
    try:
        base.eval()
        with torch.no_grad():
            mask = torch.ones_like(ids)
            logits = base(input_ids=ids, attention_mask=mask).logits
            hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
            return bool(logits.shape == (*hidden.shape[:2], vocab) and torch.equal(head(hidden), logits))
    except Exception:  # noqa: BLE001  (a model whose body cannot be called alone)
        return False
    finally:
        for m, training in modes:
            m.training = training


def token_cross_entropy(
    pieces: Sequence[tuple[torch.Tensor | Projected, torch.Tensor]],
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean (or sum / num_items_in_batch) cross-entropy over targets that are not -100.

    `pieces` are `(logits, targets)` pairs counted as one set of tokens, so logits that
    come in parts are never concatenated (a copy of a `(B, L, vocab)` tensor). Logits given
    as `Projected` (an output layer's input and weight) are scored by `LinearCrossEntropy`,
    without materialising them; pieces of the same output layer in one call (their hidden
    states are concatenated, a small copy), so that its weight is read once.
    """
    plain: list[tuple[torch.Tensor, torch.Tensor]] = []
    projected: dict[tuple[int, int], list[tuple[Projected, torch.Tensor, torch.Tensor]]] = {}
    for scores, targets in pieces:
        if isinstance(scores, Projected):
            hidden = scores.hidden.reshape(-1, scores.hidden.shape[-1])
            layer = (id(scores.weight), id(scores.bias))
            projected.setdefault(layer, []).append((scores, hidden, targets.reshape(-1).to(hidden.device)))
        else:
            logits = scores.reshape(-1, scores.shape[-1])
            plain.append((logits, targets.reshape(-1).to(logits.device)))
    every = [t for _, t in plain] + [t for group in projected.values() for _, _, t in group]
    count = None
    for targets in every:
        valid = (targets != -100).sum()
        count = valid if count is None else count + valid
    if num_items_in_batch is not None:
        count = (
            num_items_in_batch.to(count.device)
            if isinstance(num_items_in_batch, torch.Tensor)
            else num_items_in_batch
        )
    total, fused = None, None
    for logits, targets in plain:
        part = SummedCrossEntropy.apply(logits, targets)
        total = part if total is None else total + part
    for group in projected.values():
        layer = group[0][0]
        hidden = torch.cat([h for _, h, _ in group]) if len(group) > 1 else group[0][1]
        targets = torch.cat([t for _, _, t in group]) if len(group) > 1 else group[0][2]
        scale = torch.reciprocal(torch.as_tensor(count, dtype=torch.float64, device=hidden.device))
        part = LinearCrossEntropy.apply(hidden, layer.weight, layer.bias, targets, scale)
        fused = part if fused is None else fused + part
    if total is None:
        return fused
    return total / count if fused is None else total / count + fused
