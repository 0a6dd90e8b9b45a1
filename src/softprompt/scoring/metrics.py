"""Scoring: rank classification over label words, and generation metrics.

Rank classification asks the causal LM which label word is most likely after the
templated input. When every label word is a single token, one forward pass scores all
labels (the logits of the last position, nothing else is computed); otherwise each
label's words are appended and their log-likelihoods summed, all labels in one batch.
The same differentiable function gives the training loss (`class_logits`).
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from softprompt.core.model import BASE, SoftPromptModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verbalizer:
    """Label names and the words that stand for them.

    Attributes:
        labels: Label names, in class-index order.
        words: The label word of each label, as it follows the template (" positive").
        token_ids: Each word's token ids.
    """

    labels: tuple[str, ...]
    words: tuple[str, ...]
    token_ids: tuple[tuple[int, ...], ...]

    @classmethod
    def build(cls, tokenizer: Any, label_words: dict[str, str]) -> Verbalizer:
        """Tokenize the label words; refuses empty words and words shared by two labels."""
        if not label_words:
            raise ValueError("label_words is empty: give at least two labels and their words.")
        labels, words, ids = [], [], []
        for label, word in label_words.items():
            toks = tuple(tokenizer(word, add_special_tokens=False)["input_ids"])
            if not toks:
                raise ValueError(f"label word {word!r} for label {label!r} tokenizes to nothing.")
            labels.append(label)
            words.append(word)
            ids.append(toks)
        if len(set(ids)) != len(ids):
            raise ValueError(f"two labels share the same label word tokens: {dict(zip(labels, ids))}.")
        return cls(tuple(labels), tuple(words), tuple(ids))

    @property
    def single_token(self) -> bool:
        return all(len(t) == 1 for t in self.token_ids)

    def index(self, label: str) -> int:
        try:
            return self.labels.index(label)
        except ValueError:
            raise ValueError(f"label {label!r} is not one of {list(self.labels)}.") from None


def encode(tokenizer: Any, texts: Sequence[str], template: str, max_length: int) -> list[list[int]]:
    """Token ids of `template.format(text=...)` for each text, at most `max_length` tokens.

    Over-long texts are shortened (the text, never the template) until they fit.
    """
    if "{text}" not in template:
        raise ValueError(f"template {template!r} has no {{text}} placeholder.")
    out = []
    for text in texts:
        ids = tokenizer(template.format(text=text), add_special_tokens=False)["input_ids"]
        cut = text
        while len(ids) > max_length and cut:
            cut = cut[: max(0, int(len(cut) * max_length / len(ids)) - 1)]
            ids = tokenizer(template.format(text=cut), add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            raise ValueError(f"the template alone is longer than max_length={max_length} tokens.")
        out.append(list(ids))
    return out


def pad_id(tokenizer: Any) -> int:
    """The id used to pad batches: the tokenizer's pad token, else its end-of-text token, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, max_len)` ids and mask, padded on the left so every row ends in the last column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def class_logits(
    model: SoftPromptModel,
    rows: Sequence[Sequence[int]],
    verbalizer: Verbalizer,
    pad_id: int,
    adapter_names: Any = None,
    *,
    prompt_positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Log-likelihood of each label word after each input, `(B, num_labels)`; differentiable.

    Args:
        model: A CAUSAL_LM `SoftPromptModel`.
        rows: Token ids of the templated inputs.
        verbalizer: Labels and label words.
        pad_id: Padding id (any id; padded columns are masked).
        adapter_names: As for `model.forward` (`softprompt.BASE` for the bare model).
        prompt_positions: Per row, the index in `rows[i]` before which a prompt placed at a
            marker goes (see `softprompt.scoring.compose.tokenize_template`).
    """
    device = model.device
    if verbalizer.single_token:
        ids, mask = left_pad(rows, pad_id, device)
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=adapter_names,
            prompt_positions=_shifted(prompt_positions, rows, ids.shape[1], device),
            logits_to_keep=1,
        ).logits
        logprobs = F.log_softmax(logits[:, -1].float(), dim=-1)  # (B, V)
        label_ids = torch.tensor([t[0] for t in verbalizer.token_ids], device=logprobs.device)
        return logprobs.index_select(1, label_ids)
    # Multi-token label words: append each word, sum its tokens' log-probabilities.
    num_labels, batch = len(verbalizer.labels), len(rows)
    seqs = [list(r) + list(w) for w in verbalizer.token_ids for r in rows]  # label-major
    names = adapter_names
    if isinstance(adapter_names, (list, tuple)):
        names = list(adapter_names) * num_labels
    positions = list(prompt_positions) * num_labels if prompt_positions is not None else None
    ids, mask = left_pad(seqs, pad_id, device)
    longest = max(len(w) for w in verbalizer.token_ids)
    logits = model(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=names,
        prompt_positions=_shifted(positions, seqs, ids.shape[1], device),
        logits_to_keep=longest + 1,
    ).logits
    logprobs = F.log_softmax(logits.float(), dim=-1)  # (C*B, longest+1, V)
    scores = torch.zeros(num_labels * batch, device=logprobs.device)
    for c, word in enumerate(verbalizer.token_ids):
        n = len(word)
        rows_c = slice(c * batch, (c + 1) * batch)
        # word token j sits at column -(n - j) and is predicted by the column before it
        pred = logprobs[rows_c, -(n + 1) : -1]  # (B, n, V)
        target = torch.tensor(word, device=logprobs.device).expand(batch, n)
        scores[rows_c] = pred.gather(2, target.unsqueeze(-1)).squeeze(-1).sum(dim=1)
    return scores.view(num_labels, batch).t()


def _shifted(
    positions: Sequence[int] | None, rows: Sequence[Sequence[int]], width: int, device: Any
) -> torch.Tensor | None:
    """Prompt positions within rows, moved by the rows' left padding to `width` columns."""
    if positions is None:
        return None
    if len(positions) != len(rows):
        raise ValueError(f"prompt_positions has {len(positions)} entries for {len(rows)} rows.")
    return torch.tensor([width - len(r) + int(p) for r, p in zip(rows, positions)], device=device)


def classify(
    model: SoftPromptModel,
    rows: Sequence[Sequence[int]],
    verbalizer: Verbalizer,
    pad_id: int,
    *,
    adapter: str | None = None,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
    prompt_positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Class scores for every row with one adapter (None or BASE: the bare model), `(n, C)`.

    Rows are batched by length, so padding stays small, and returned in input order.
    `prompt_positions`: per row, where a prompt placed at a marker goes (see `class_logits`).
    """
    name = adapter or BASE
    scores = torch.empty(len(rows), len(verbalizer.labels))

    def score(idx: list[int]) -> None:
        batch = [rows[i] for i in idx]
        positions = None if prompt_positions is None else [prompt_positions[i] for i in idx]
        scores[idx] = class_logits(
            model, batch, verbalizer, pad_id, [name] * len(batch), prompt_positions=positions
        ).cpu()
        if progress:
            progress(len(idx))

    in_length_batches(model, rows, batch_size, score)
    return scores


def in_length_batches(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    batch_size: int,
    score: Callable[[list[int]], None],
) -> None:
    """Call `score` with the indices of `rows` in batches of `batch_size`, shortest rows first
    (so each batch pads little), `model` in eval mode and without gradients; the model's mode
    is restored after, also when `score` raises."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                score(order[start : start + batch_size])
    finally:
        model.train(was_training)


def accuracy(scores: torch.Tensor, gold: Sequence[int]) -> float:
    if len(gold) == 0:
        return float("nan")
    return float((scores.argmax(dim=1) == torch.tensor(list(gold))).float().mean())


# ---------------------------------------------------------------------- generation metrics
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD's normalisation)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, target: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(target))


def token_f1(prediction: str, target: str) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def generation_metrics(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    """Mean exact match and token F1 (after `normalize_answer`)."""
    n = max(len(targets), 1)
    return {
        "exact_match": sum(exact_match(p, t) for p, t in zip(predictions, targets)) / n,
        "f1": sum(token_f1(p, t) for p, t in zip(predictions, targets)) / n,
    }
