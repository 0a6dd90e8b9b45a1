"""bfloat16 passes from a cached prompt on CPU attend over a multiple of 16 keys (masked
columns in front of the prompt, see `attention.key_padding`) and give the results of the
unpadded keys up to bfloat16 rounding."""

from __future__ import annotations

import pytest
import torch

from softprompt import BASE, PromptTuningConfig, wrap
from softprompt.core import attention
from tests.tiny import PAD, VOCAB, build_model


def _batch(length: int = 7):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (3, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids[mask == 0] = PAD
    return ids, mask


def _model(arch: str, dtype: torch.dtype):
    torch.manual_seed(0)
    model = wrap(
        build_model("CAUSAL_LM", arch).to(dtype),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "a",
    )
    model.add_adapter("b", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    return model


def _key_lengths(monkeypatch):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    seen = []

    def spy(query, key, value, *args, **kw):
        seen.append((query.shape[2], key.shape[2]))
        return sdpa(query, key, value, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


def _run(model, ids, mask, names):
    """Training loss, logits and prompt gradients, then inference logits (twice: the second
    from the remembered prompt KV)."""
    model.train()
    out = model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=names)
    prompts = [model.prompts[n].embedding for n in ("a", "b")]
    grads = [g for g in torch.autograd.grad(out.loss, prompts, allow_unused=True) if g is not None]
    model.eval()
    with torch.no_grad():
        infer = [model(input_ids=ids, attention_mask=mask, adapter_names=names).logits for _ in range(2)]
    return [out.loss.detach(), out.logits.detach(), *grads, *infer]


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_bfloat16_cached_prompt_keys_are_aligned_and_match_unpadded(arch, monkeypatch):
    model = _model(arch, torch.bfloat16)
    ids, mask = _batch()
    seen = _key_lengths(monkeypatch)
    for names in ("a", ["a", "b", BASE]):
        seen.clear()
        padded = _run(model, ids, mask, names)
        users = [k for q, k in seen if q == ids.shape[1]]
        assert users and all(k % attention.KEY_ALIGNMENT == 0 for k in users), seen
        with monkeypatch.context() as m:
            m.setattr(attention, "key_padding", lambda *args: 0)
            model.clear_prompt_cache()
            seen.clear()
            plain = _run(model, ids, mask, names)
            assert {k for q, k in seen if q == ids.shape[1]} == {ids.shape[1] + 5}, seen
        model.clear_prompt_cache()
        for a, b in zip(padded, plain, strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_padding_only_for_bfloat16_on_cpu():
    model = build_model("CAUSAL_LM", "llama")
    cpu = torch.device("cpu")
    assert attention.key_padding(model, cpu, torch.bfloat16, 84) == 12
    assert attention.key_padding(model, cpu, torch.bfloat16, 96) == 0
    assert attention.key_padding(model, cpu, torch.float32, 84) == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.key_padding(model, cpu, torch.float32, 84) == 12
    assert attention.key_padding(model, torch.device("meta"), torch.bfloat16, 84) == 0
    model.set_attn_implementation("eager")
    assert attention.key_padding(model, cpu, torch.bfloat16, 84) == 0


def test_float32_keys_are_not_padded(monkeypatch):
    model = _model("llama", torch.float32)
    ids, mask = _batch()
    seen = _key_lengths(monkeypatch)
    _run(model, ids, mask, "a")
    assert {k for q, k in seen if q == ids.shape[1]} == {ids.shape[1] + 5}, seen
