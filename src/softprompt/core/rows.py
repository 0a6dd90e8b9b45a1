"""Which prompt each row of a batch gets, and where it goes: the rows' prompts resolved from
`adapter_names` (a name, a combination, or none), stacked right-aligned, and laid out with
the row's tokens (`softprompt.core.layout`). A part of `SoftPromptModel` (`RowPrompts`), kept
apart from the forward's paths (`softprompt.core.cached_prompts`) and the adapter files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from softprompt.core import introspect
from softprompt.core.config import PromptPosition
from softprompt.core.layout import Layout, build_layout
from softprompt.core.prefix import right_aligned

#: An `adapter_names` entry meaning "no prompt for this row" (the bare model).
BASE = "__base__"
#: One row's prompt: an adapter name, a tuple of names (their prompts concatenated in that
#: order), or None (no prompt).
RowPrompt = str | tuple[str, ...] | None
AdapterNames = list[str | tuple[str, ...] | None] | str | None
#: Per row, the user column before which a MARKER-placed prompt goes: `(B,)` or B ints.
PromptPositions = torch.Tensor | list[int] | tuple[int, ...] | None


class RowPrompts:
    """`SoftPromptModel`'s rows: resolving `adapter_names`, each row's prompt and its place."""

    # set by SoftPromptModel
    base_model: Any
    prompts: Any
    peft_config: dict[str, Any]
    heads: dict[str, Any]
    position_style: Any
    active_adapter: str
    _disabled: bool
    device: torch.device
    _require: Callable[[str], None]  # KeyError naming the loaded adapters

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
        names = [row_prompt(n) for n in adapter_names]
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


def row_prompt(entry: Any) -> RowPrompt:
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
