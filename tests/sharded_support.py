"""What the FSDP and ZeRO-3 worker processes check alike: prompts initialised from a sharded
embedding table, and a training and an evaluation pass, against the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 60 examples: 15 batches of 4, so the 8th step of 2 batches has one, and when the model is sharded
# rank 1 makes a stand-in pass (every rank must make the same passes: each gathers weights)
FLOAT32_15_BATCHES = ("--no-bf16", "--max-train-examples", "60")

# ---------------------------------------------------------------------- runs that must agree
# Two runs that take the same steps on the same examples - 1 process against 2, plain against
# FSDP or ZeRO-3 - compute the same sums, but not with the same kernels on the same memory: the
# matrix products run with other shapes (a micro-batch per rank), on weights gathered into
# other buffers (other alignments), and MKL/oneDNN pick their blocking and vector paths by shape,
# alignment and CPU (an AVX2 EPYC rounds differently from an AMX Xeon). So the floats may differ
# in their last bits, and how much is bounded by float32's precision and the length of the sums.
# What must be equal exactly: what rounding cannot move - dev and test metrics (predictions),
# which step was best, how many examples were seen.
F32_EPS = torch.finfo(torch.float32).eps
# The tiny runs of test_distributed.py: steps, learning rate (`_train_args`) and the length of the
# longest sum in a step: the prompt's gradient sums over the global batch's positions (8 examples
# x at most 16 positions: 4 virtual tokens + a review of <= 8 tokens + template) and through the
# widest layer (intermediate size 64); nested sums round at most once per level: 8 * 16 + 64 terms.
TINY_RUN_STEPS, TINY_RUN_LR, TINY_RUN_TERMS = 8, 0.05, 8 * 16 + 64


# The widest layer of the tiny models (tests/tiny.py: GPT-2's inner layer is 4 x hidden 32).
TINY_WIDEST = 128


def same_to_float32_rounding(got: torch.Tensor, want: torch.Tensor, positions: int) -> bool:
    """`got` equals `want`, computed by one pass of a tiny model over `positions` positions on
    other memory (weights gathered from shards, another linear autograd function), to the
    rounding of float32 sums of `positions + TINY_WIDEST` terms relative to `want`'s largest
    magnitude. A real mistake (a wrong shard, a missing row) moves values by their own size."""
    atol = (positions + TINY_WIDEST) * F32_EPS * want.abs().max().item()
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=0, atol=atol))


def pass_report(grads: list, logits: list, positions: int, report: dict, key: str) -> None:
    """`report` gets whether the sharded model's gradient and logits (`grads[1]`, `logits[1]`)
    equal the whole model's to float32 rounding, and its predictions exactly."""
    report[f"{key} gradient to float32 rounding"] = same_to_float32_rounding(grads[1], grads[0], positions)
    report[f"{key} cached-KV logits to float32 rounding"] = same_to_float32_rounding(
        logits[1], logits[0], positions
    )
    report[f"{key} predictions equal"] = bool(torch.equal(logits[1].argmax(-1), logits[0].argmax(-1)))


def float32_prompt_atol(
    steps: int = TINY_RUN_STEPS, lr: float = TINY_RUN_LR, terms: int = TINY_RUN_TERMS
) -> float:
    """How far apart two float32 prompts may be after `steps` Adam steps at `lr` whose gradients
    are the same sums of at most `terms` terms, taken in other orders.

    A float32 sum of n terms is within n * eps of the exact sum (relative to the terms'
    magnitudes), so two orders differ by about that much; Adam's step is lr * m / sqrt(v),
    invariant to the gradient's scale, so a relative change r of the gradient moves a step by
    about lr * r; and the steps' differences add up: steps * lr * n * eps (9e-6 for the tiny
    runs; seen: at most 4e-6 on an AMX Xeon and 5.4e-7 on an AVX2 EPYC).
    """
    return steps * lr * terms * F32_EPS


def assert_same_training(out: Path, reference: Path, folders: tuple[str, ...] = ("last", "best")) -> None:
    """The run in `out` took the steps of the run in `reference`: its prompts equal to float32
    rounding (`float32_prompt_atol`), its losses to the rounding of a sum of `TINY_RUN_TERMS`
    terms, and exactly the same dev metrics at the same steps, the same best step and the same
    test results."""
    from tests.test_distributed import _evals, _prompt, _records

    atol = float32_prompt_atol()
    for folder in folders:
        torch.testing.assert_close(_prompt(out / folder), _prompt(reference / folder), rtol=0, atol=atol)
    assert _evals(out) == _evals(reference) and _evals(out), (_evals(out), _evals(reference))
    assert json.loads((out / "results.json").read_text()) == json.loads(
        (reference / "results.json").read_text()
    )
    ends = [[r for r in _records(run) if r.get("event") == "end"] for run in (out, reference)]
    assert [e["best_step"] for e in ends[0]] == [e["best_step"] for e in ends[1]] and ends[0]
    losses = [[r["loss"] for r in _records(run) if "loss" in r] for run in (out, reference)]
    assert losses[0] == pytest.approx(losses[1], rel=TINY_RUN_TERMS * F32_EPS, abs=0) and losses[0]


def two_rank_reports(script: str, folder: Path, *args: str, timeout: float = 240) -> list[dict]:
    """Run `script` under torchrun on 2 CPU processes (`script folder *args`); each rank writes
    `folder/rank{rank}.json`, returned as [rank 0's, rank 1's]."""
    from tests.test_distributed import _env

    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               script, str(folder), *args]  # fmt: skip
    result = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)]


INITS = {
    "TEXT": {"prompt_tuning_init_text": "classify the sentiment of this review"},
    "CLASS_LABELS": {"prompt_tuning_init_text": ["positive", "negative"]},
    "SAMPLE_VOCAB": {},
    "RANDOM": {},
}


def prompts_of_every_init(bases, tokenizer, report: dict, key: str) -> list:
    """A `SoftPromptModel` on each of `bases` (the whole model, then the sharded one) with a
    TEXT-initialised default adapter and one adapter per initialisation, the same seeds for
    each; `report` gets whether each prompt is bit-identical across them."""
    from softprompt import PromptTuningConfig, SoftPromptModel

    models = []
    for base in bases:
        torch.manual_seed(11)
        first = PromptTuningConfig(
            num_virtual_tokens=6, prompt_tuning_init="TEXT", tokenizer_name_or_path="tiny", **INITS["TEXT"]
        )
        model = SoftPromptModel(base, first, tokenizer=tokenizer)  # initialised in the constructor
        for name, extra in INITS.items():  # and through add_adapter
            torch.manual_seed(12)
            config = PromptTuningConfig(
                num_virtual_tokens=6, prompt_tuning_init=name, tokenizer_name_or_path="tiny", **extra
            )
            model.add_adapter(name, config, tokenizer=tokenizer)
        models.append(model)
    for name in ("default", *INITS):
        a, b = (m.prompts[name].embedding.detach() for m in models)
        report[f"{key} init {name} bit-identical"] = bool(torch.equal(a, b))
    return models


# (rows, tokens) of `training_and_evaluation_passes`' batch; with the 6 virtual tokens of
# `prompts_of_every_init`, PASS_POSITIONS positions
PASS_SHAPE = (3, 7)
PASS_POSITIONS = PASS_SHAPE[0] * (PASS_SHAPE[1] + 6)


def training_and_evaluation_passes(models: list, rank: int, vocab: int) -> tuple[list, list]:
    """Each model's default-prompt gradient from a training pass on the uncached prompt path
    (as the trainer takes it when the model is sharded) and its logits from an evaluation pass
    (the cached prompt KV), on this rank's own batch."""
    ids = torch.randint(4, vocab, PASS_SHAPE, generator=torch.Generator().manual_seed(rank))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    grads = []
    for model in models:
        model.prefix_cache = False
        model.prompts["default"].embedding.grad = None
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append(model.prompts["default"].embedding.grad.clone())
        model.prefix_cache = True
    with torch.no_grad():
        logits = [m(input_ids=ids, attention_mask=mask).logits for m in models]
    return grads, logits
