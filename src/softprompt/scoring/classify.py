"""Label new, unlabelled texts with a trained classification prompt.

The same rank classification as `softprompt eval` (`softprompt.scoring.metrics`): each text is
put into the run's template, every label word is scored after it, and the probability of
a label is the softmax over the labels' scores. Used by `softprompt classify` and by the
server's `/v1/classify`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from softprompt.scoring.compose import encode_template
from softprompt.scoring.metrics import Verbalizer, classify, pad_id
from softprompt.settings import adapter_run

__all__ = ["classify_texts", "label_probs", "run_settings"]


def classify_texts(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    adapter: str | None,
    template: str,
    label_words: dict[str, str],
    max_length: int = 256,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The label and the probability of every label for each text.

    Args:
        model: A CAUSAL_LM `SoftPromptModel`.
        tokenizer: Its tokenizer.
        texts: Texts to label (no gold labels needed).
        adapter: The adapter to use (None: the bare model).
        template: The run's template, with a `{text}` placeholder (and ``{prompt}`` where the
            prompt goes, for an adapter placed at a marker).
        label_words: Label name -> label word (as it follows the template).
        max_length: Longest templated input in tokens (longer texts are shortened).
        batch_size: Texts per forward pass.

    Returns:
        One `{"label": str, "probs": {label: probability}}` per text, in input order.
    """
    if not texts:
        return []
    verbalizer = Verbalizer.build(tokenizer, label_words)
    rows, positions = encode_template(tokenizer, list(texts), template, max_length)
    scores = classify(
        model,
        rows,
        verbalizer,
        pad_id(tokenizer),
        adapter=adapter,
        batch_size=batch_size,
        prompt_positions=positions,
    )
    return label_probs(verbalizer.labels, scores)


def label_probs(labels: Sequence[str], scores: torch.Tensor) -> list[dict[str, Any]]:
    """Per row of `scores` (`(n, len(labels))`, label scores or log-probabilities): the most
    probable label and the probability of every label (a softmax over the labels, in float64),
    as `{"label": str, "probs": {label: probability}}`."""
    probs = torch.softmax(scores.double(), dim=1)
    out = []
    for row in probs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        out.append({"label": labels[best], "probs": dict(zip(labels, row))})
    return out


def run_settings(adapter_path: str | Path) -> dict[str, Any]:
    """What the run an adapter came from used: `template`, `label_words`, `task`, `model`,
    `max_length` (see `softprompt.settings.adapter_run`); empty when there is no run_config.json.

    Raises:
        ValueError: The run_config.json exists but cannot be read.
    """

    run = adapter_run(adapter_path)
    if run is None:
        return {}
    return {
        "template": run.template,
        "label_words": run.label_words,
        "task": run.task,
        "model": run.model,
        "max_length": run.max_length,
    }
