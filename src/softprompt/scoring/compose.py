"""Composing prompts: templates that place the prompt inside the input, and ensembles.

A template such as ``"Review: {text}\\n{prompt}Sentiment:"`` says where an adapter placed
at a marker (`PromptTuningConfig(prompt_position="MARKER")`) puts its virtual tokens.
`tokenize_template` turns texts into token ids plus, per row, the index of the token
before which the prompt goes; `pad_templated` pads them into the `input_ids`,
`attention_mask` and `prompt_positions` that `SoftPromptModel.forward` / `generate` take.
The two sides of ``{prompt}`` are tokenized separately, so no token straddles the
boundary: the model sees exactly the left tokens, the prompt, then the right tokens.

`ensemble_scores` scores classification inputs with several prompts in one batched pass
(each input repeated once per prompt, one mixed-adapter batch) and averages the members'
label log-probabilities (Lester et al., 2021, section 7).
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.core.model import RowPrompt, SoftPromptModel
from softprompt.scoring.metrics import Verbalizer, class_logits, encode, in_length_batches

__all__ = [
    "EnsembleScores",
    "Templated",
    "encode_template",
    "ensemble_scores",
    "has_prompt_marker",
    "pad_templated",
    "parse_template",
    "tokenize_template",
]

TEXT_FIELD = "text"
PROMPT_FIELD = "prompt"


@dataclass(frozen=True)
class Templated:
    """One input laid out by a template.

    Attributes:
        ids: The token ids of the templated input, without the prompt.
        prompt_position: The index in `ids` before which the prompt goes
            (`len(ids)`: after the last token).
    """

    ids: list[int]
    prompt_position: int


def parse_template(template: str) -> tuple[str, str]:
    """Split a template at its ``{prompt}`` marker.

    The template is a `str.format` string with exactly one ``{text}`` and one ``{prompt}``
    field (literal braces are written ``{{`` and ``}}``).

    Returns:
        The format strings before and after ``{prompt}`` (one of them holds ``{text}``).

    Raises:
        ValueError: The template is not a string format, has no ``{prompt}`` or no
            ``{text}``, has one of them twice, or has another field; the message names it.
    """
    if not isinstance(template, str):
        raise TypeError(f"template must be a string; got {type(template).__name__}.")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as err:
        raise ValueError(
            f"template {template!r} is not a valid format string ({err}); "
            "write literal braces as {{ and }}."
        ) from None
    counts = {TEXT_FIELD: 0, PROMPT_FIELD: 0}
    before: list[str] = []
    after: list[str] = []
    side = before
    for literal, name, spec, conversion in parts:
        side.append(_escape(literal))
        if name is None:
            continue
        if name not in counts or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise ValueError(
                f"template {template!r} has the field {shown}; only {{text}} (the input) and {{prompt}} "
                "(where the prompt goes) are allowed; write literal braces as {{ and }}."
            )
        counts[name] += 1
        if name == PROMPT_FIELD:
            side = after
        else:
            side.append("{text}")
    for name, count in counts.items():
        if count == 0:
            hint = (
                "the place of the prompt, e.g. 'Review: {text}\\n{prompt}Sentiment:'"
                if name == PROMPT_FIELD
                else "the place of the input text"
            )
            raise ValueError(f"template {template!r} has no {{{name}}} marker; add one: {hint}.")
        if count > 1:
            raise ValueError(
                f"template {template!r} has {count} {{{name}}} markers; give exactly one "
                f"(a row has one {'prompt' if name == PROMPT_FIELD else 'input text'})."
            )
    return "".join(before), "".join(after)


def _escape(literal: str) -> str:
    """A literal piece of a template, escaped again for `str.format`."""
    return literal.replace("{", "{{").replace("}", "}}")


def tokenize_template(
    tokenizer: Any, template: str, texts: Sequence[str], *, max_length: int | None = None
) -> list[Templated]:
    """Token ids and the prompt's place for each text put into `template`.

    The text before ``{prompt}`` and the text after it are tokenized separately (without
    special tokens, as `softprompt.scoring.metrics.encode` does), so the prompt sits exactly
    between two tokens. Where ``{prompt}`` is the template's first or last field, the ids
    equal `encode`'s for the same template without the marker.

    Args:
        tokenizer: A transformers tokenizer.
        template: E.g. ``"Review: {text}\\n{prompt}Sentiment:"`` (see `parse_template`).
        texts: The inputs; empty strings are fine.
        max_length: At most this many tokens per row (the prompt not counted); longer
            texts are shortened (the text, never the template). None: no limit.

    Raises:
        ValueError: An invalid template (see `parse_template`), or a template longer than
            `max_length` on its own.
    """
    left, right = parse_template(template)
    out = []
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings; got {type(text).__name__}.")
        row = _tokenize(tokenizer, left, right, text)
        cut = text
        while max_length is not None and len(row.ids) > max_length and cut:
            cut = cut[: max(0, int(len(cut) * max_length / len(row.ids)) - 1)]
            row = _tokenize(tokenizer, left, right, cut)
        if max_length is not None and len(row.ids) > max_length:
            raise ValueError(f"the template alone is longer than max_length={max_length} tokens.")
        out.append(row)
    return out


def _tokenize(tokenizer: Any, left: str, right: str, text: str) -> Templated:
    pieces = [_ids(tokenizer, side.format(text=text)) for side in (left, right)]
    return Templated(pieces[0] + pieces[1], len(pieces[0]))


def _ids(tokenizer: Any, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pad_templated(
    rows: Sequence[Templated], pad_id: int, *, side: str = "left", device: Any = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad templated rows into a batch.

    Args:
        rows: From `tokenize_template`.
        pad_id: Any id; padded columns are masked.
        side: "left" (what decoder generation wants) or "right".
        device: Where the tensors go.

    Returns:
        `input_ids` `(B, L)`, `attention_mask` `(B, L)` and `prompt_positions` `(B,)`: each
        row's prompt index shifted by its left padding.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}.")
    if not rows:
        raise ValueError("pad_templated needs at least one row.")
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r.ids) if side == "left" else 0
        ids[i, start : start + len(r.ids)] = torch.tensor(r.ids, dtype=torch.long)
        mask[i, start : start + len(r.ids)] = 1
        positions[i] = start + r.prompt_position
    return ids.to(device), mask.to(device), positions.to(device)


@dataclass
class EnsembleScores:
    """Label log-probabilities of an ensemble of prompts.

    Attributes:
        mean: `(n, num_labels)` the mean over members of each label's log-probability.
        members: `(num_members, n, num_labels)` each member's label log-probabilities
            (log-softmax over the labels of the label words' log-likelihoods).
        adapters: The members, in order.
    """

    mean: torch.Tensor
    members: torch.Tensor
    adapters: list[RowPrompt]

    def predictions(self) -> torch.Tensor:
        """The ensemble's label index per input, `(n,)`."""
        return self.mean.argmax(dim=1)


def ensemble_scores(
    model: SoftPromptModel,
    rows: Sequence[Sequence[int]],
    verbalizer: Verbalizer,
    pad_id: int,
    adapters: Sequence[RowPrompt],
    *,
    prompt_positions: Sequence[int] | None = None,
    batch_size: int = 64,
) -> EnsembleScores:
    """Score classification inputs with several prompts in one batched pass per batch.

    Each batch of `batch_size` inputs is repeated once per member and run as one
    mixed-adapter batch; every member's scores equal those of running it alone (up to
    float rounding from different padding).

    Args:
        model: A CAUSAL_LM `SoftPromptModel` holding the members' adapters.
        rows: Token ids of the templated inputs (`Templated.ids` for a marker template).
        verbalizer: Labels and label words.
        pad_id: Padding id.
        adapters: The members: adapter names (or tuples of names, or `softprompt.BASE`).
        prompt_positions: Per input, the index in its row before which a MARKER prompt goes
            (`Templated.prompt_position`); members placed as a prefix ignore it.
        batch_size: Inputs per pass (the pass has `batch_size * len(adapters)` rows).

    Returns:
        The mean and per-member label log-probabilities, rows in input order.
    """
    members = list(adapters)
    if not members:
        raise ValueError("an ensemble needs at least one adapter.")
    if prompt_positions is not None and len(prompt_positions) != len(rows):
        raise ValueError(
            f"prompt_positions has {len(prompt_positions)} entries for {len(rows)} rows; give one per row."
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}.")
    count, num_labels = len(members), len(verbalizer.labels)
    scores = torch.empty(count, len(rows), num_labels)

    def score(idx: list[int]) -> None:
        batch = [rows[i] for i in idx] * count  # member-major: member m's copy at m*n + j
        names = [m for m in members for _ in idx]
        positions = None
        if prompt_positions is not None:
            positions = [int(prompt_positions[i]) for i in idx] * count
        logits = class_logits(model, batch, verbalizer, pad_id, names, prompt_positions=positions)
        scores[:, idx] = logits.float().cpu().view(count, len(idx), num_labels)

    in_length_batches(model, rows, batch_size, score)
    logprobs = F.log_softmax(scores, dim=-1)
    return EnsembleScores(logprobs.mean(dim=0), logprobs, members)


def has_prompt_marker(template: str) -> bool:
    """Whether `template` says where the prompt goes with a ``{prompt}`` field (else the prompt
    is a prefix and the template is used as it always was)."""
    try:
        return any(name == "prompt" for _, name, _, _ in string.Formatter().parse(template))
    except ValueError:  # not a format string: `encode` reports it
        return False


def encode_template(
    tokenizer: Any, texts: Sequence[str], template: str, max_length: int
) -> tuple[list[list[int]], list[int] | None]:
    """Token ids of each templated text and, for a template with ``{prompt}``, the index in each
    row before which the prompt goes (`tokenize_template`).

    Returns:
        `(rows, prompt_positions)`; `prompt_positions` is None for a template without
        ``{prompt}``, whose rows are exactly `encode`'s.
    """
    if not has_prompt_marker(template):
        return encode(tokenizer, texts, template, max_length), None
    rows = tokenize_template(tokenizer, template, texts, max_length=max_length)
    return [r.ids for r in rows], [r.prompt_position for r in rows]
