"""Train a soft prompt with the Hugging Face `Trainer` (offline, on a tiny model).

A `SoftPromptModel` is an ordinary `nn.Module` whose forward takes the usual
`input_ids` / `attention_mask` / `labels` (and the Trainer's `num_items_in_batch`), so the
Trainer works unchanged; only the prompt's parameters require gradients, so only they
are optimised. Save with `model.save_pretrained` (PEFT's format) rather than the
Trainer's own checkpoints, which would contain the frozen base model too.

Run: python examples/hf_trainer.py [output_folder]
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from softprompt import PromptTuningConfig, SoftPromptModel, wrap


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        initializer_range=0.5,
    )
    return LlamaForCausalLM(config)


class Sequences(torch.utils.data.Dataset):
    """Counting sequences, left-padded to 8 tokens: 'a a+1 a+2 ...'."""

    def __init__(self, n: int = 64) -> None:
        self.rows = []
        for i in range(n):
            start, length = 5 + i % 20, 4 + i % 5
            ids = list(range(start, start + length))
            pad = 8 - length
            self.rows.append(
                {
                    "input_ids": torch.tensor([0] * pad + ids),
                    "attention_mask": torch.tensor([0] * pad + [1] * length),
                    "labels": torch.tensor([-100] * pad + ids),
                }
            )

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


def main(out_dir: str) -> dict[str, object]:
    model = wrap(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))
    args = TrainingArguments(
        output_dir=out_dir,
        max_steps=40,
        per_device_train_batch_size=16,
        learning_rate=0.3,
        lr_scheduler_type="constant",
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    data = Sequences()
    trainer = Trainer(model=model, args=args, train_dataset=data)
    result = trainer.train()
    model.save_pretrained(f"{out_dir}/prompt", overwrite=True)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print(f"Trainer losses: {[round(x, 3) for x in losses]}")
    reloaded = SoftPromptModel.from_pretrained(tiny_model(), f"{out_dir}/prompt")
    assert torch.equal(reloaded.get_prompt(), model.get_prompt())
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "train_loss": result.training_loss,
        "model": model,
    }


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="softprompt-trainer-"))
