"""What the FSDP and ZeRO-3 worker processes check alike: prompts initialised from a sharded
embedding table, and a training and an evaluation pass, against the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

# 60 examples: 15 batches of 4, so the 8th step of 2 batches has one, and when the model is sharded
# rank 1 makes a stand-in pass (every rank must make the same passes: each gathers weights)
FLOAT32_15_BATCHES = ("--no-bf16", "--max-train-examples", "60")


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


def training_and_evaluation_passes(models: list, rank: int, vocab: int) -> tuple[list, list]:
    """Each model's default-prompt gradient from a training pass on the uncached prompt path
    (as the trainer takes it when the model is sharded) and its logits from an evaluation pass
    (the cached prompt KV), on this rank's own batch."""
    ids = torch.randint(4, vocab, (3, 7), generator=torch.Generator().manual_seed(rank))
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
