"""One `TaskSpec` per task type: how the base model is called and what the user gets back.

This is the only module that branches on the task type. Every spec receives the batch
already laid out by `softprompt.core.layout` (prompt columns first) and returns the base
model's output object with:

- losses computed so that padding and the prompt never change them (labels at padded
  columns are ignored; the last prompt token predicts the first user token in causal LM);
- per-token outputs (logits, start/end logits, hidden states) cut back to the user's
  columns, so shapes match the bare model's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.loss.loss_utils import ForSequenceClassificationLoss
from transformers.modeling_outputs import CausalLMOutputWithPast, SequenceClassifierOutputWithPast

from softprompt.core.config import TaskType
from softprompt.core.introspect import is_encoder_decoder
from softprompt.core.layout import Layout
from softprompt.core.losses import Projected, linear_output_layer, token_cross_entropy
from softprompt.core.prefix import backbone


@dataclass
class Call:
    """Everything a task needs for one forward pass.

    Attributes:
        base: The frozen transformers model.
        layout: The laid-out batch.
        inputs: Keyword arguments for the base model (embeddings, mask, positions...).
        labels: The user's labels, in the user's columns (or per example).
        extra: Task inputs other than labels (start/end positions).
        full_sequence: Return per-token outputs for all model columns, prompt included.
        num_items_in_batch: Divide summed token losses by this (gradient accumulation).
        prompt_logits: With a cached prompt, the last virtual token's logits `(B, V)`
            (it predicts the first user token).
        return_logits: False when the caller needs the loss only (see
            `SoftPromptModel.forward`).
        packed: N > 0 when the batch runs as one packed sequence behind an N-token prompt
            (`attention.PackedPlan`; loss-only calls of tasks with `packed_training`).
    """

    base: nn.Module
    layout: Layout
    inputs: dict[str, Any]
    labels: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    full_sequence: bool = False
    num_items_in_batch: int | torch.Tensor | None = None
    prompt_logits: torch.Tensor | None = None
    return_logits: bool = True
    packed: int = 0


def _trim(call: Call, out: Any, names: tuple[str, ...]) -> Any:
    """Cut per-token outputs back to the user's columns (unless the full sequence is asked for)."""
    if call.full_sequence:
        return out
    layout = call.layout
    for name in names:
        value = out.get(name) if hasattr(out, "get") else None
        if not isinstance(value, torch.Tensor):
            continue
        if value.shape[1] == layout.prompt_width + layout.user_len:
            out[name] = layout.user_part(value)
        elif value.shape[1] > layout.user_len:  # `logits_to_keep`: the last columns
            out[name] = value[:, -layout.user_len :]
    hidden = out.get("hidden_states") if hasattr(out, "get") else None
    if isinstance(hidden, tuple) and not is_encoder_decoder(call.base):
        out["hidden_states"] = tuple(call.layout.user_part(h) for h in hidden)
    return out


class TaskSpec:
    """How one task type runs through a prompted model."""

    task_type: TaskType
    #: Names of the head modules trained with the prompt when `modules_to_save` is None.
    head_names: tuple[str, ...] = ()
    #: Whether `generate` applies.
    generative: bool = False
    #: PEFT's `num_transformer_submodules` for this task.
    num_transformer_submodules: int = 1
    #: Task inputs besides `labels` that this task consumes.
    extra_inputs: tuple[str, ...] = ()
    #: Whether the loss needs the last virtual token's logits (see `softprompt.core.prefix`).
    prompt_logits: bool = False
    #: Whether loss-only training calls may run as one packed pass (see `Call.packed`).
    packed_training: bool = False
    #: The transformers Auto class that loads a model for this task.
    auto_class: str = "AutoModel"

    def forward(self, call: Call) -> Any:
        raise NotImplementedError

    def check_model(self, base: nn.Module) -> None:
        """Raise if `base` cannot do this task with a prompt."""


class CausalLM(TaskSpec):
    task_type = TaskType.CAUSAL_LM
    auto_class = "AutoModelForCausalLM"
    generative = True
    prompt_logits = True
    packed_training = True

    def check_model(self, base: nn.Module) -> None:
        if is_encoder_decoder(base):
            raise ValueError(
                f"{type(base).__name__} is an encoder-decoder model; use task_type='SEQ_2_SEQ_LM'."
            )

    def forward(self, call: Call) -> Any:
        head = None
        if not call.return_logits and call.labels is not None:
            head = linear_output_layer(call.base)
        if head is None:
            if call.packed:
                raise ValueError("a packed pass needs an output layer the loss can score (see losses).")
            out = _last_columns_logits(call.base, call.inputs)
            scores, prompt_scores = out.logits, call.prompt_logits
        else:
            out, scores, prompt_scores = self._loss_only(call, head)
        if call.labels is not None:
            targets = call.layout.next_token_targets(call.labels)  # (B, T) model columns
            width = scores.shape[1] if head is None else scores.hidden.shape[1]
            if prompt_scores is not None and width == call.layout.user_len:
                # Cached or packed prompt: the last virtual token's logits (which predict
                # the first user token) come from the prompt's own pass or columns.
                targets = targets[:, -width - 1 :]
                pieces = [(prompt_scores, targets[:, 0]), (scores, targets[:, 1:])]
            else:
                # The logits cover the last columns (all of them, or `logits_to_keep`).
                pieces = [(scores, targets[:, targets.shape[1] - width :])]
            out["loss"] = token_cross_entropy(pieces, call.num_items_in_batch)
        return _trim(call, out, ("logits",))

    @staticmethod
    def _loss_only(call: Call, head: nn.Linear) -> tuple[Any, Projected, Any]:
        """The model's body only: its output (no logits), the output layer's input for the
        loss (`Projected`, see `losses.LinearCrossEntropy`) and the last virtual token's
        (`Projected` for a packed pass, else `call.prompt_logits`)."""

        inputs = dict(call.inputs)
        keep = inputs.pop("logits_to_keep", 0)
        body = backbone(call.base)(**inputs)
        hidden = body.last_hidden_state  # (B, T, H)
        prompt_scores = call.prompt_logits
        if call.packed:  # (1, N + B * L, H): the prompt, then every row
            n, batch = call.packed, call.layout.batch_size
            prompt, rows = hidden[0].split([n, hidden.shape[1] - n])  # one split: one backward copy
            prompt_scores = Projected(prompt[-1].expand(batch, -1), head.weight, head.bias)  # (B, H)
            hidden = rows.unflatten(0, (batch, -1))  # (B, L, H)
        if isinstance(keep, int):
            hidden = hidden[:, -keep:] if keep > 0 else hidden
        else:  # transformers' 1-D tensor of columns
            hidden = hidden[:, keep]
        return _causal_lm_output(body), Projected(hidden, head.weight, head.bias), prompt_scores


def _causal_lm_output(body: Any, **values: Any) -> Any:
    """A causal LM's output object from its body's (cache, hidden states...) and `values`."""

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return CausalLMOutputWithPast(**{k: v for k, v in body.items() if k in fields}, **values)


def _last_columns_logits(base: nn.Module, inputs: dict[str, Any]) -> Any:
    """`base(**inputs)`, with the logits of the last `logits_to_keep` columns (an int) computed
    from a contiguous copy of their hidden states where the output layer is a plain linear
    layer (`losses.linear_output_layer`: the same logits as the model's own).

    transformers slices the last hidden state as a view, `(B, k, H)` with the strides of the
    whole `(B, T, H)`; torch cannot fold that view into one matrix product and multiplies it
    by B copies of the `(V, H)` weight in a batched product instead, forward and backward.
    For SmolLM2's 49k-token vocabulary on an AVX2 EPYC that took 0.5 s for 64 rows (about
    20 ms from a contiguous copy): a tenth of an evaluation and of a training step.
    """
    keep = inputs.get("logits_to_keep")
    head = linear_output_layer(base) if isinstance(keep, int) and keep > 0 else None
    if head is None:
        return base(**inputs)

    body = backbone(base)(**{k: v for k, v in inputs.items() if k != "logits_to_keep"})
    hidden = body.last_hidden_state[:, -keep:].contiguous()
    return _causal_lm_output(body, logits=head(hidden))


class Seq2SeqLM(TaskSpec):
    task_type = TaskType.SEQ_2_SEQ_LM
    auto_class = "AutoModelForSeq2SeqLM"
    generative = True
    num_transformer_submodules = 2

    def check_model(self, base: nn.Module) -> None:
        if not is_encoder_decoder(base):
            raise ValueError(
                f"{type(base).__name__} is not an encoder-decoder model; SEQ_2_SEQ_LM needs one "
                "(T5, BART...). For a decoder-only model use task_type='CAUSAL_LM'."
            )

    def forward(self, call: Call) -> Any:
        # The prompt sits on the encoder side only; decoder inputs and labels are untouched,
        # so the model's own loss is already right.
        out = call.base(**call.inputs, labels=call.labels)
        return _trim(call, out, ("encoder_last_hidden_state",))


class SequenceClassification(TaskSpec):
    task_type = TaskType.SEQ_CLS
    auto_class = "AutoModelForSequenceClassification"
    head_names = ("classifier", "score")

    def forward(self, call: Call) -> Any:
        base = call.base
        if hasattr(base, "score") and not is_encoder_decoder(base):
            return self._last_token(call)
        out = base(**call.inputs, labels=call.labels)
        return _trim(call, out, ())

    @staticmethod
    def _last_token(call: Call) -> Any:
        """Decoder classifiers: pool the last attended token (never a pad, whatever the side)."""

        base = call.base
        backbone = getattr(base, base.base_model_prefix)
        hidden = backbone(**call.inputs).last_hidden_state  # (B, T, H)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        pooled = hidden[rows, call.layout.last_attended().to(hidden.device)]  # (B, H)
        logits = base.score(pooled)  # (B, num_labels)
        loss = None
        if call.labels is not None:
            loss = ForSequenceClassificationLoss(call.labels.to(logits.device), logits, base.config)
        return SequenceClassifierOutputWithPast(loss=loss, logits=logits)


class TokenClassification(TaskSpec):
    task_type = TaskType.TOKEN_CLS
    auto_class = "AutoModelForTokenClassification"
    head_names = ("classifier", "score")

    def forward(self, call: Call) -> Any:
        out = _trim(call, call.base(**call.inputs), ("logits",))
        if call.labels is not None:
            logits = out.logits if not call.full_sequence else call.layout.user_part(out.logits)
            targets = call.labels.to(logits.device).masked_fill(
                call.layout.user_mask.to(logits.device) == 0, -100
            )
            out["loss"] = token_cross_entropy([(logits, targets)], call.num_items_in_batch)
        return out


class QuestionAnswering(TaskSpec):
    task_type = TaskType.QUESTION_ANS
    auto_class = "AutoModelForQuestionAnswering"
    head_names = ("qa_outputs",)
    extra_inputs = ("start_positions", "end_positions")

    def forward(self, call: Call) -> Any:
        out = _trim(call, call.base(**call.inputs), ("start_logits", "end_logits"))
        start, end = call.extra.get("start_positions"), call.extra.get("end_positions")
        if start is not None and end is not None:
            # Positions index the user's tokens; the answer is an attended user token, so
            # the prompt and padding are left out of the softmax. Out-of-range positions
            # are ignored, as in transformers.
            loss = 0.0
            for name, pos in (("start_logits", start), ("end_logits", end)):
                logits = out[name] if not call.full_sequence else call.layout.user_part(out[name])
                logits = logits.float().masked_fill(
                    call.layout.user_mask.to(logits.device) == 0, float("-inf")
                )
                length = logits.shape[1]
                target = pos.reshape(-1).to(logits.device).long()
                target = target.masked_fill((target < 0) | (target >= length), length)
                _check_attended(name.replace("_logits", "_positions"), target, logits, length)
                loss = loss + F.cross_entropy(logits, target, ignore_index=length)
            out["loss"] = loss / 2
        return out


def _check_attended(name: str, target: torch.Tensor, logits: torch.Tensor, length: int) -> None:
    """Refuse an in-range answer position on a padding token: it is out of the softmax, so
    its loss would be infinite (`length` marks positions that are ignored)."""
    rows = torch.arange(target.shape[0], device=target.device)
    valid = target < length
    padded = valid & torch.isinf(logits[rows, target.clamp(max=length - 1)])
    if bool(padded.any()):
        row = int(padded.nonzero()[0, 0])
        raise ValueError(
            f"{name}[{row}] = {int(target[row])} points at a padding token of row {row}; answer "
            "positions must index attended tokens of the input (or lie outside it to be ignored)."
        )


class FeatureExtraction(TaskSpec):
    task_type = TaskType.FEATURE_EXTRACTION

    def forward(self, call: Call) -> Any:
        out = call.base(**call.inputs)
        return _trim(call, out, ("last_hidden_state", "encoder_last_hidden_state"))


TASKS: dict[TaskType, TaskSpec] = {
    spec.task_type: spec
    for spec in (
        CausalLM(),
        Seq2SeqLM(),
        SequenceClassification(),
        TokenClassification(),
        QuestionAnswering(),
        FeatureExtraction(),
    )
}


def task_spec(task_type: TaskType | str) -> TaskSpec:
    return TASKS[TaskType.parse(task_type, "task_type")]
