"""wrap -> train a few steps -> save -> load -> generate, on a tiny model built locally.

Run: python examples/quickstart.py [output_folder]
Swap `tiny_model()` for `AutoModelForCausalLM.from_pretrained(...)` to use a real model.
"""

from __future__ import annotations

import sys
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt import PromptTuningConfig, SoftPromptModel, wrap

STEPS = 60


def tiny_model() -> LlamaForCausalLM:
    # A large init range: with the default 0.02 a random model's logits are near uniform
    # and no prompt can steer it. A pretrained model needs no such thing.
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


def main(out_dir: str) -> torch.Tensor:
    # 1. Wrap: the base model is frozen, only 8 virtual tokens are trained.
    model = wrap(tiny_model(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8))

    # 2. Train the prompt to make the model continue 5 6 7 8 ... with 9 10 11.
    batch = torch.tensor([[5, 6, 7, 8, 9, 10, 11]] * 4)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=0.3)
    for step in range(STEPS):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    print(f"loss after {STEPS} steps: {loss.item():.3f}")

    # 3. Save: adapter_config.json + adapter_model.safetensors (PEFT's format).
    model.save_pretrained(out_dir, overwrite=True)

    # 4. Load onto a fresh copy of the base model and generate.
    loaded = SoftPromptModel.from_pretrained(tiny_model(), out_dir)
    out = loaded.generate(input_ids=torch.tensor([[5, 6, 7, 8]]), max_new_tokens=3, do_sample=False)
    print("generated:", out[0].tolist())
    return out


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="softprompt-"))
