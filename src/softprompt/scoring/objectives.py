"""What a training run optimises and how it is scored: classification or generation.

Both objectives hold pre-tokenized data and expose the same three methods, so the
training loop and the `eval` command never branch on the kind of data:

- `loss(model, indices)`: differentiable loss of a batch of example indices;
- `evaluate(model, indices, adapter)`: metrics of one adapter (or the bare model);
- `lengths`: token counts, for length-grouped batching.

A template with ``{prompt}`` (e.g. ``"Review: {text}\n{prompt}Sentiment:"``) puts the prompt
inside the input: the objective then keeps, per example, the index before which it goes
(`prompt_positions`) and passes it to every forward and generate call; the run's prompt is
placed at a marker (`PromptTuningConfig.prompt_position="MARKER"`). Without ``{prompt}``
nothing changes: `prompt_positions` is None and the prompt is a prefix.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from softprompt.core.model import BASE, SoftPromptModel
from softprompt.scoring.compose import encode_template, ensemble_scores
from softprompt.scoring.metrics import (
    Verbalizer,
    _shifted,
    class_logits,
    classify,
    generation_metrics,
    left_pad,
    pad_id,
)
from softprompt.sharding import distributed

if TYPE_CHECKING:
    from softprompt.core.model import RowPrompt
    from softprompt.scoring.compose import EnsembleScores


@dataclass
class ClassificationObjective:
    """Rank classification over label words (cross-entropy over the labels' log-likelihoods).

    Attributes:
        rows: Token ids of each templated input.
        gold: Class index of each example.
        verbalizer: Labels and their words.
        pad_id: Padding id.
        prompt_positions: Per example, the index in its row before which the prompt goes
            (a template with ``{prompt}``); None: the prompt is a prefix.
    """

    rows: list[list[int]]
    gold: list[int]
    verbalizer: Verbalizer
    pad_id: int
    primary_metric: str = "accuracy"
    prompt_positions: list[int] | None = None

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        texts: Sequence[str],
        labels: Sequence[str],
        template: str,
        label_words: dict[str, str],
        max_length: int,
    ) -> ClassificationObjective:
        verbalizer = Verbalizer.build(tokenizer, label_words)
        rows, positions = encode_template(tokenizer, texts, template, max_length)
        gold = [verbalizer.index(label) for label in labels]
        return cls(rows, gold, verbalizer, _pad_id(tokenizer), prompt_positions=positions)

    @property
    def lengths(self) -> list[int]:
        return [len(r) for r in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def loss(self, model: SoftPromptModel, indices: Sequence[int]) -> torch.Tensor:
        scores = class_logits(
            model,
            [self.rows[i] for i in indices],
            self.verbalizer,
            self.pad_id,
            prompt_positions=_positions(self.prompt_positions, indices),
        )
        gold = torch.tensor([self.gold[i] for i in indices], device=scores.device)
        return F.cross_entropy(scores, gold)

    def evaluate(
        self,
        model: SoftPromptModel,
        indices: Sequence[int] | None = None,
        adapter: str | None = None,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        idx = list(range(len(self.rows))) if indices is None else list(indices)
        return self.metrics(idx, self.predict(model, idx, adapter, batch_size, progress))

    def predict(
        self,
        model: SoftPromptModel,
        indices: Sequence[int],
        adapter: str | None = None,
        batch_size: int = 64,
        progress: Callable[[int], None] | None = None,
    ) -> list[torch.Tensor]:
        """The label scores of each example of `indices` (one row of floats each)."""
        if not indices:
            return []
        scores = classify(
            model,
            [self.rows[i] for i in indices],
            self.verbalizer,
            self.pad_id,
            adapter=adapter,
            batch_size=batch_size,
            progress=progress,
            prompt_positions=_positions(self.prompt_positions, indices),
        )
        return list(scores.detach().cpu())

    def ensemble(
        self,
        model: SoftPromptModel,
        adapters: Sequence[RowPrompt],
        indices: Sequence[int] | None = None,
        batch_size: int = 64,
    ) -> EnsembleScores:
        """Label log-probabilities of several prompts and their mean, in one batched pass per
        batch of `batch_size` examples (`softprompt.scoring.compose.ensemble_scores`)."""
        idx = list(range(len(self.rows))) if indices is None else list(indices)
        return ensemble_scores(
            model,
            [self.rows[i] for i in idx],
            self.verbalizer,
            self.pad_id,
            list(adapters),
            prompt_positions=_positions(self.prompt_positions, idx),
            batch_size=batch_size,
        )

    def metrics(self, indices: Sequence[int], predictions: Sequence[torch.Tensor]) -> dict[str, float]:
        """Accuracy and per-class recall of `predictions` (from `predict`) for `indices`."""
        idx = list(indices)
        gold = torch.tensor([self.gold[i] for i in idx])
        pred = torch.stack(list(predictions)).argmax(dim=1) if idx else gold
        out = {
            "accuracy": float((pred == gold).float().mean()) if idx else float("nan"),
            "examples": len(idx),
        }
        for c, label in enumerate(self.verbalizer.labels):  # per-class recall shows a collapsed classifier
            mask = gold == c
            if mask.any():
                out[f"recall_{label}"] = float((pred[mask] == c).float().mean())
        return out


@dataclass
class GenerationObjective:
    """Input -> target text: causal-LM loss on the target tokens, exact match / F1 on generations.

    Attributes:
        prompts: Token ids of each templated input.
        targets: Token ids of each target (followed by EOS when the tokenizer has one).
        target_texts: The targets as text, for the metrics.
        prompt_positions: Per example, the index in its input before which the prompt goes
            (a template with ``{prompt}``); None: the prompt is a prefix.
    """

    prompts: list[list[int]]
    targets: list[list[int]]
    target_texts: list[str]
    tokenizer: Any
    pad_id: int
    max_new_tokens: int = 32
    primary_metric: str = "f1"
    extra: dict[str, Any] = field(default_factory=dict)
    prompt_positions: list[int] | None = None

    @classmethod
    def build(
        cls,
        tokenizer: Any,
        texts: Sequence[str],
        targets: Sequence[str],
        template: str,
        max_length: int,
        max_new_tokens: int = 32,
    ) -> GenerationObjective:
        prompts, positions = encode_template(tokenizer, texts, template, max_length)
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        target_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) + eos for t in targets]
        return cls(
            prompts,
            target_ids,
            list(targets),
            tokenizer,
            _pad_id(tokenizer),
            max_new_tokens,
            prompt_positions=positions,
        )

    @property
    def lengths(self) -> list[int]:
        return [len(p) + len(t) for p, t in zip(self.prompts, self.targets)]

    def __len__(self) -> int:
        return len(self.prompts)

    def loss(self, model: SoftPromptModel, indices: Sequence[int]) -> torch.Tensor:
        seqs = [self.prompts[i] + self.targets[i] for i in indices]
        device = model.device
        ids, mask = left_pad(seqs, self.pad_id, device)
        labels = torch.full_like(ids, -100)
        for row, i in enumerate(indices):
            n = len(self.targets[i])
            labels[row, ids.shape[1] - n :] = ids[row, ids.shape[1] - n :]
        longest = max(len(self.targets[i]) for i in indices)
        positions = _shifted(_positions(self.prompt_positions, indices), seqs, ids.shape[1], device)
        # the loss only: no (B, longest + 1, vocab) logits (see SoftPromptModel.forward)
        extra = {} if positions is None else {"prompt_positions": positions}
        return model(
            input_ids=ids,
            attention_mask=mask,
            labels=labels,
            logits_to_keep=longest + 1,
            return_logits=False,
            **extra,
        ).loss

    def evaluate(
        self,
        model: SoftPromptModel,
        indices: Sequence[int] | None = None,
        adapter: str | None = None,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, float]:
        idx = list(range(len(self.prompts))) if indices is None else list(indices)
        return self.metrics(idx, self.predict(model, idx, adapter, batch_size, progress))

    def predict(
        self,
        model: SoftPromptModel,
        indices: Sequence[int],
        adapter: str | None = None,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """The greedy generation of each example of `indices`."""
        return self.generate(
            model,
            [self.prompts[i] for i in indices],
            adapter,
            batch_size,
            progress,
            prompt_positions=_positions(self.prompt_positions, indices),
        )

    def metrics(self, indices: Sequence[int], predictions: Sequence[str]) -> dict[str, float]:
        """Exact match / F1 of `predictions` (from `predict`) for `indices`."""
        idx = list(indices)
        out = generation_metrics(list(predictions), [self.target_texts[i] for i in idx])
        out["examples"] = len(idx)
        return out

    def generate(
        self,
        model: SoftPromptModel,
        prompts: Sequence[Sequence[int]],
        adapter: str | None,
        batch_size: int,
        progress: Callable[[int], None] | None = None,
        prompt_positions: Sequence[int] | None = None,
    ) -> list[str]:
        """Greedy generations for token-id inputs; `prompt_positions`: per input, where a prompt
        placed at a marker goes."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        device = model.device
        was_training = model.training
        model.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = [prompts[i] for i in idx]
                ids, mask = left_pad(batch, self.pad_id, device)
                positions = _shifted(_positions(prompt_positions, idx), batch, ids.shape[1], device)
                with torch.no_grad():
                    out = model.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        prompt_positions=positions,
                        adapter_names=adapter or BASE,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        pad_token_id=self.pad_id,
                    )
                for row, i in enumerate(idx):
                    texts[i] = self.tokenizer.decode(
                        out[row, ids.shape[1] :], skip_special_tokens=True
                    ).strip()
                if progress:
                    progress(len(idx))
        finally:
            model.train(was_training)
        return texts


Objective = ClassificationObjective | GenerationObjective


def _pad_id(tokenizer: Any) -> int:
    return pad_id(tokenizer)


def _positions(positions: Sequence[int] | None, indices: Sequence[int]) -> list[int] | None:
    """The prompt positions of the examples `indices` (None for prefix prompts)."""
    return None if positions is None else [positions[i] for i in indices]


def evaluate(
    objective: Objective,
    model: SoftPromptModel,
    indices: Sequence[int] | None = None,
    adapter: str | None = None,
    progress: Callable[[int], None] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """`objective.evaluate`, with the examples shared out over the ranks of a distributed run:
    each rank predicts its shard, the predictions are gathered in the original order, and
    every rank computes the metrics of all of them, so they equal the 1-process numbers."""
    idx = list(range(len(objective))) if indices is None else list(indices)
    if distributed.world_size() == 1:
        return objective.evaluate(model, idx, adapter=adapter, progress=progress, **kwargs)
    positions = distributed.shard(range(len(idx)))
    mine = objective.predict(model, [idx[p] for p in positions], adapter, progress=progress, **kwargs)
    predictions: list[Any] = [None] * len(idx)
    for where, preds in distributed.gather_objects((positions, mine)):
        for p, pred in zip(where, preds):
            predictions[p] = pred
    return objective.metrics(idx, predictions)


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group: int = 50
) -> list[list[int]]:
    """A deterministic epoch of batches: shuffled, then sorted by length within groups of
    `group` batches so each batch pads little, then the batch order shuffled again.

    The same (seed, epoch) always gives the same batches, which is what makes a resumed
    run identical to an uninterrupted one.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * group
    batches: list[list[int]] = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
