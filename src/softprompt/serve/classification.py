"""`/v1/classify` for a served adapter: rank classification with the template, label words and
max_length of the adapter's run, as `softprompt classify` scores.

The engines differ only in where the label scores come from, so each keeps a few lines
(`Engine.classify`, `VllmEngine.classify`) and the rest is here:

- `on_model`: the built-in engine's model scores every label word after each templated
  text in batched forward passes (`softprompt.scoring.classify.classify_texts`), on the
  engine's worker thread.
- `by_next_token`: an engine that only answers "the log-probabilities of these tokens after
  these inputs" (vLLM). The first token of every label is asked in one call per text, each
  further token of a label of several tokens in a call of its own; a label's score is the
  sum of its tokens' log-probabilities, the same score as `on_model`'s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from softprompt.scoring.classify import classify_texts, label_probs
from softprompt.scoring.compose import encode_template
from softprompt.scoring.metrics import Verbalizer
from softprompt.serve.adapters import AdapterRegistry

#: One question to the engine: (text index, input token ids, the `{prompt}` marker's index
#: or None, the token ids whose log-probabilities are wanted after the input).
Call = tuple[int, list[int], int | None, list[int]]
#: The engine's answers: (text index, input ids) -> token id -> log-probability.
Answers = dict[tuple[int, tuple[int, ...]], dict[int, float]]

DEFAULT_MAX_LENGTH = 256


def on_model(
    model: Any, tokenizer: Any, registry: AdapterRegistry, name: str, texts: list[str], max_length: int | None
) -> list[dict[str, Any]]:
    """Classify `texts` with served adapter `name` on the model itself.

    Raises:
        ServeError: The adapter's run gives no template and label words.
        NotFound: `name` is not served (any more).
    """
    template, words, run_max = registry.classification_settings(name)
    return classify_texts(
        model,
        tokenizer,
        texts,
        adapter=registry.internal(name),
        template=template,
        label_words=words,
        max_length=max_length or run_max or DEFAULT_MAX_LENGTH,
    )


def by_next_token(
    tokenizer: Any,
    registry: AdapterRegistry,
    name: str,
    texts: list[str],
    max_length: int | None,
    ask: Callable[[list[Call]], Answers],
) -> list[dict[str, Any]]:
    """Classify `texts` with served adapter `name`, the label scores from `ask` (see the
    module docstring); `ask` gets every call at once, to run them concurrently.

    Raises:
        ServeError: The adapter's run gives no template and label words.
    """
    template, words, run_max = registry.classification_settings(name)
    verbalizer = Verbalizer.build(tokenizer, words)
    rows, positions = encode_template(
        tokenizer, list(texts), template, max_length or run_max or DEFAULT_MAX_LENGTH
    )
    where = positions or [None] * len(rows)
    firsts = sorted({ids[0] for ids in verbalizer.token_ids})
    calls: list[Call] = [(i, row, where[i], firsts) for i, row in enumerate(rows)]
    for i, row in enumerate(rows):
        for ids in verbalizer.token_ids:
            for k in range(1, len(ids)):
                calls.append((i, row + list(ids[:k]), where[i], [ids[k]]))
    answers = ask(calls)
    scores = torch.zeros(len(rows), len(verbalizer.labels), dtype=torch.float64)
    for i, row in enumerate(rows):
        for j, ids in enumerate(verbalizer.token_ids):
            scores[i, j] = sum(answers[(i, tuple(row + list(ids[:k])))][ids[k]] for k in range(len(ids)))
    return label_probs(verbalizer.labels, scores)
