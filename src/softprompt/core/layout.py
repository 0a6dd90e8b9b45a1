"""Where prompt and user tokens sit in the sequence the base model sees.

This module is the only place that concatenates prompts with inputs, extends attention
masks, computes position ids and maps labels and outputs between the user's columns and
the model's columns.

Every row of the model's sequence is `[prompt-pad][prompt][user tokens]`: a batch whose
rows use prompts of different lengths pads the shorter prompts on the left, so every
prompt ends in the same column and starts at position 0. Masked columns (prompt-pad and
the user's own padding, left or right) are excluded from attention, and positions count
attended columns only, so a padded row gives exactly the numbers it gives alone:

- models that take `position_ids` get `cumsum(mask) - 1` (plus the model's offset, e.g.
  RoBERTa's `padding_idx + 1`);
- models that are not causal decoders (encoders, encoder-decoders) also get their rows
  *compacted*: attended columns first, in order, padding last. Models that derive
  positions from the layout itself (T5's relative buckets, BART's learned positions)
  then see exactly the unpadded sequence, and poolers that read column 0 (BERT's [CLS]
  pooler) read the first prompt token in every row. Outputs are mapped back to the
  user's columns. Causal decoders are never compacted: generation appends at the right.

A prompt can also sit inside the input (`insert_at`, a per-row index into the user's
columns): the row is then `[user[:m]][prompt-pad][prompt][user[m:]]`, a reordering of the
same columns, so masks, positions, labels and output maps all follow from the one
permutation `Layout.perm` (composed with the compaction above where that applies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PositionStyle:
    """How a model learns where a token is.

    Args:
        pass_ids: Give the model explicit `position_ids`.
        compact: Reorder columns so attended ones come first (non-causal models).
        offset: Added to every attended position.
        pad_value: Position id given to masked columns.
    """

    pass_ids: bool = True
    compact: bool = False
    offset: int = 0
    pad_value: int = 0


def _gather_columns(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`x[b, index[b, j], ...]` for `x` of shape `(B, T, ...)` and `index` of shape `(B, J)`."""
    shape = index.shape + x.shape[2:]
    index = index.reshape(index.shape + (1,) * (x.dim() - 2)).expand(shape)
    return torch.gather(x, 1, index)


def positions_from_mask(mask: torch.Tensor, style: PositionStyle) -> torch.Tensor:
    """Position ids counting attended columns only, `(B, T)` long."""
    mask = mask.long()
    pos = (mask.cumsum(dim=1) - 1).clamp_min(0) + style.offset
    return pos.masked_fill(mask == 0, style.pad_value)


@dataclass
class Layout:
    """A batch laid out for the base model, and the maps back to the user's columns.

    "Model columns" are the `T = prompt_width + user_len` columns of the full sequence.
    When the prompt's keys and values come from a cache (`prompt_cached`, see
    `softprompt.core.prefix`), the model runs on the user's columns only and its per-token
    outputs are already user-aligned.

    Attributes:
        inputs_embeds: `(B, T, H)`, or None when only masks were laid out.
        attention_mask: `(B, T)` long.
        position_ids: `(B, T)` long, or None for models that take none.
        prompt_width: P, the prompt columns (longest prompt in the batch).
        user_len: L, the user's columns.
        user_mask: `(B, L)` the user's own attention mask.
        perm: `(B, T)`: model column j holds concatenated column `perm[b, j]`; None if the
            columns were not reordered.
        inv: the inverse of `perm`.
        prompt_cached: The prompt is supplied as a KV cache, not as input columns.
    """

    inputs_embeds: torch.Tensor | None
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None
    prompt_width: int
    user_len: int
    user_mask: torch.Tensor
    perm: torch.Tensor | None = None
    inv: torch.Tensor | None = None
    prompt_cached: bool = False

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    def extend(self, x: torch.Tensor, fill: float) -> torch.Tensor:
        """User-aligned `(B, L, ...)` to model columns `(B, T, ...)`, prompt columns = `fill`."""
        pad = x.new_full((x.shape[0], self.prompt_width) + tuple(x.shape[2:]), fill)
        full = torch.cat([pad, x], dim=1)
        return full if self.perm is None else _gather_columns(full, self.perm)

    def user_part(self, y: torch.Tensor) -> torch.Tensor:
        """A per-token model output `(B, T, ...)` (or `(B, L, ...)` when the prompt was
        cached) to the user's columns `(B, L, ...)`."""
        if self.prompt_cached:
            return y
        if self.inv is None:
            return y[:, self.prompt_width :]
        return _gather_columns(y, self.inv[:, self.prompt_width :])

    def last_attended(self) -> torch.Tensor:
        """Each row's last attended column, `(B,)`, as an index into the model's outputs."""
        mask = self.attention_mask
        cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (cols * (mask > 0)).amax(dim=1)
        return last - self.prompt_width if self.prompt_cached else last

    def next_token_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Causal-LM targets in model columns, `(B, T)`.

        The target of an attended column is the label of the next attended column, so the
        last prompt token predicts the first user token and padding never sits between a
        token and its prediction. Labels at padded user columns are ignored (-100).
        """
        lab = self.extend(labels, -100).masked_fill(self.attention_mask == 0, -100)
        # Attended columns first, in order: a stable sort of "is padding".
        order = torch.sort((self.attention_mask == 0).int(), dim=1, stable=True).indices
        lab_sorted = lab.gather(1, order)
        nxt = torch.cat([lab_sorted[:, 1:], lab_sorted.new_full((lab.shape[0], 1), -100)], dim=1)
        return torch.empty_like(lab).scatter_(1, order, nxt)


def insertion_order(insert_at: torch.Tensor, width: int, length: int) -> torch.Tensor:
    """The column order that moves the prompt block inside each row, `(B, P + L)` long.

    Concatenated columns are `[prompt block (P)][user (L)]`; model column `j` of row `b`
    holds concatenated column `order[b, j]`, so the row reads
    `[user[:m]][prompt block][user[m:]]` with `m = insert_at[b]`.

    Args:
        insert_at: `(B,)` the user column before which the prompt goes, `0 <= m <= L`.
        width: P, the prompt columns.
        length: L, the user's columns.
    """
    cols = torch.arange(width + length, device=insert_at.device).unsqueeze(0)  # (1, T)
    m = insert_at.long().unsqueeze(1)  # (B, 1)
    before = cols < m  # user columns in front of the prompt
    inside = (cols >= m) & (cols < m + width)  # the prompt block
    return torch.where(before, cols + width, torch.where(inside, cols - m, cols))


def build_layout(
    style: PositionStyle,
    prompt_mask: torch.Tensor,
    user_mask: torch.Tensor,
    prompts: torch.Tensor | None = None,
    user_embeds: torch.Tensor | None = None,
    insert_at: torch.Tensor | None = None,
) -> Layout:
    """Lay out prompts and user tokens for the base model.

    Args:
        style: How the model encodes positions.
        prompt_mask: `(B, P)`, 1 where the row has a prompt token (prompts right-aligned).
        user_mask: `(B, L)` the user's attention mask.
        prompts: `(B, P, H)` right-aligned prompts, already in the model's dtype.
        user_embeds: `(B, L, H)` the user's token embeddings.
        insert_at: `(B,)` per row, the user column before which the prompt goes
            (`0..L`; L: after the last column). None: in front of every row.
    """
    mask = torch.cat([prompt_mask.to(user_mask.device, torch.long), user_mask.long()], dim=1)
    embeds = None
    if prompts is not None and user_embeds is not None:
        embeds = torch.cat([prompts.to(user_embeds.dtype), user_embeds], dim=1)
    width, length = int(prompt_mask.shape[1]), int(user_mask.shape[1])
    perm = inv = None
    if insert_at is not None:
        perm = insertion_order(insert_at.to(mask.device), width, length)
        mask = mask.gather(1, perm)
        if embeds is not None:
            embeds = _gather_columns(embeds, perm)
    # Reorder only when some padding precedes an attended column.
    if style.compact and not bool((mask[:, 1:] <= mask[:, :-1]).all()):
        order = torch.sort((mask == 0).int(), dim=1, stable=True).indices
        perm = order if perm is None else perm.gather(1, order)
        mask = mask.gather(1, order)
        if embeds is not None:
            embeds = _gather_columns(embeds, order)
    if perm is not None:
        inv = torch.argsort(perm, dim=1)
    positions = positions_from_mask(mask, style) if style.pass_ids else None
    return Layout(embeds, mask, positions, width, length, user_mask, perm, inv)
