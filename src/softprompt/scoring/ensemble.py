"""Ensembles of soft prompts: several prompts score the same inputs, their label
log-probabilities are averaged (Lester et al., 2021, section 7).

All members run in one batched pass per batch of inputs (each input repeated once per
prompt, one mixed-adapter batch: `softprompt.scoring.compose.ensemble_scores`), so the frozen
model is called once per batch instead of once per prompt and batch.

- `evaluate_ensemble`: labelled texts -> accuracy of the ensemble and of each member
  (`score_ensemble` does the same for an objective built by a run; `softprompt eval
  --ensemble`).
- `classify_ensemble`: unlabelled texts -> the ensemble's label and each member's
  (`softprompt classify --ensemble`).
- `check_same_format`: the members' runs must share template and label words.

`softprompt.training.seeds.train_seeds` trains one prompt per seed and scores their ensemble
(`softprompt train --seeds 0,1,2`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from softprompt.scoring.classify import label_probs
from softprompt.scoring.compose import encode_template, ensemble_scores
from softprompt.scoring.metrics import Verbalizer, pad_id
from softprompt.scoring.objectives import ClassificationObjective
from softprompt.settings import adapter_run

if TYPE_CHECKING:
    from softprompt.core.model import RowPrompt, SoftPromptModel
    from softprompt.scoring.compose import EnsembleScores

__all__ = [
    "EnsembleResult",
    "check_same_format",
    "classify_ensemble",
    "evaluate_ensemble",
    "score_ensemble",
]


def _member_name(adapter: RowPrompt) -> str:
    if isinstance(adapter, tuple):
        return "+".join(adapter)
    return "bare model" if adapter is None or adapter == "__base__" else str(adapter)


@dataclass
class EnsembleResult:
    """The scores of an ensemble and of its members on labelled data.

    Attributes:
        ensemble: Metrics of the ensemble (the argmax of the members' mean label
            log-probability): accuracy, per-class recall, examples.
        members: Each member's metrics, by adapter name, in member order.
        scores: The label log-probabilities themselves (`.mean`, `.members`).
        seconds: Time of the batched pass.
        primary_metric: The metric that picks `best_member`.
    """

    ensemble: dict[str, float]
    members: dict[str, dict[str, float]]
    scores: EnsembleScores
    seconds: float
    primary_metric: str = "accuracy"

    @property
    def member_mean(self) -> dict[str, float]:
        """The mean over members of each metric."""
        first = next(iter(self.members.values()))
        return {k: sum(m[k] for m in self.members.values()) / len(self.members) for k in first}

    @property
    def best_member(self) -> str:
        """The member with the highest primary metric (the first of equals)."""
        return max(self.members, key=lambda name: self.members[name][self.primary_metric])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ensemble, members, member_mean, best_member (name and metrics), seconds."""
        return {
            "ensemble": self.ensemble,
            "members": self.members,
            "member_mean": self.member_mean,
            "best_member": {"name": self.best_member, **self.members[self.best_member]},
            "seconds": round(self.seconds, 3),
        }


def score_ensemble(
    objective: ClassificationObjective,
    model: SoftPromptModel,
    adapters: Sequence[RowPrompt],
    indices: Sequence[int] | None = None,
    batch_size: int = 64,
) -> EnsembleResult:
    """Score the examples `indices` (None: all) of a classification objective with an ensemble
    of `adapters` (loaded into `model`) in one batched pass per batch.

    Raises:
        TypeError: The objective is not a classification one.
        ValueError: No adapters, or the same adapter twice.
    """
    if not isinstance(objective, ClassificationObjective):
        raise TypeError(
            "an ensemble averages label log-probabilities, so it needs classification data "
            "(label words); score generation adapters one by one."
        )
    names = [_member_name(a) for a in adapters]
    if len(set(names)) != len(names):
        raise ValueError(f"an ensemble's members must be different adapters; got {names}.")
    idx = list(range(len(objective))) if indices is None else list(indices)
    start = time.perf_counter()
    scores = objective.ensemble(model, adapters, idx, batch_size=batch_size)
    seconds = time.perf_counter() - start
    members = {name: objective.metrics(idx, list(scores.members[m])) for m, name in enumerate(names)}
    return EnsembleResult(
        objective.metrics(idx, list(scores.mean)), members, scores, seconds, objective.primary_metric
    )


def evaluate_ensemble(
    model: SoftPromptModel,
    tokenizer: Any,
    adapters: Sequence[RowPrompt],
    texts: Sequence[str],
    labels: Sequence[str],
    *,
    template: str,
    label_words: dict[str, str],
    max_length: int = 256,
    batch_size: int = 64,
) -> EnsembleResult:
    """Accuracy of an ensemble of prompts and of each of its members on labelled texts.

    Example:
        >>> model = SoftPromptModel.from_pretrained(base, "runs/a/best", adapter_name="a")
        >>> model.load_adapter("runs/b/best", "b"); model.load_adapter("runs/c/best", "c")
        >>> result = evaluate_ensemble(model, tokenizer, ["a", "b", "c"], texts, labels,
        ...     template="Review: {text}\\nSentiment:",
        ...     label_words={"positive": " positive", "negative": " negative"})
        >>> result.ensemble["accuracy"], result.member_mean["accuracy"], result.best_member

    Args:
        model: A CAUSAL_LM `SoftPromptModel` holding the members' adapters.
        tokenizer: Its tokenizer.
        adapters: The members' adapter names (or tuples of names, or `softprompt.BASE`).
        texts: Inputs.
        labels: Their gold labels (keys of `label_words`).
        template: The members' template, with ``{text}`` (and ``{prompt}`` for prompts
            placed at a marker).
        label_words: Label -> label word, as the members were trained with.
        max_length: Longest templated input in tokens.
        batch_size: Inputs per pass (each pass runs `batch_size * len(adapters)` rows).

    Returns:
        An `EnsembleResult`: the ensemble's metrics (the argmax of the members' mean label
        log-probability), each member's, their mean, the best member, the scores.
    """
    objective = ClassificationObjective.build(tokenizer, texts, labels, template, label_words, max_length)
    return score_ensemble(objective, model, adapters, batch_size=batch_size)


def classify_ensemble(
    model: SoftPromptModel,
    tokenizer: Any,
    texts: Sequence[str],
    adapters: Sequence[RowPrompt],
    *,
    template: str,
    label_words: dict[str, str],
    max_length: int = 256,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """Label unlabelled texts with an ensemble of prompts.

    Returns:
        Per text `{"label", "probs", "members"}`: the ensemble's label and probabilities (a
        softmax over the labels of the members' mean log-probability), and for each member
        (by name) its own `{"label", "probs"}`.
    """

    if not texts:
        return []
    verbalizer = Verbalizer.build(tokenizer, label_words)
    rows, positions = encode_template(tokenizer, list(texts), template, max_length)
    scores = ensemble_scores(
        model,
        rows,
        verbalizer,
        pad_id(tokenizer),
        list(adapters),
        prompt_positions=positions,
        batch_size=batch_size,
    )
    names = [_member_name(a) for a in adapters]
    ensemble = label_probs(verbalizer.labels, scores.mean)
    members = [label_probs(verbalizer.labels, scores.members[m]) for m in range(len(names))]
    return [
        {**ensemble[i], "members": {name: members[m][i] for m, name in enumerate(names)}}
        for i in range(len(texts))
    ]


def check_same_format(adapter_dirs: Sequence[tuple[str, str | Path]]) -> None:
    """Refuse an ensemble whose members were trained with different templates or label words.

    Args:
        adapter_dirs: `(name, folder)` of each member; the run of each folder
            (`softprompt.settings.adapter_run`) is compared, folders without one are not.

    Raises:
        ValueError: Two members' runs differ; the message names both and the difference.
    """

    seen: tuple[str, Any] | None = None
    for name, folder in adapter_dirs:
        run = adapter_run(folder)
        if run is None:
            continue
        if seen is None:
            seen = (name, run)
            continue
        first_name, first = seen
        for what in ("task", "template", "label_words"):
            a, b = getattr(first, what), getattr(run, what)
            if a != b:
                raise ValueError(
                    f"the ensemble's adapters {first_name} and {name} were trained with different "
                    f"{what.replace('_', ' ')} ({a!r} vs {b!r}); every member scores the same inputs with "
                    "the same label words, so ensemble adapters from runs that share them."
                )
