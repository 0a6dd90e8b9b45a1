"""Many adapters on one frozen model: the adapter API and per-row prompts and heads."""

from __future__ import annotations

import pytest
import torch

from softprompt import BASE, PromptTuningConfig, SoftPromptModel, wrap
from tests.tiny import VOCAB, build_model


def _cls_model():
    model = wrap(build_model("SEQ_CLS", "llama"), PromptTuningConfig(num_virtual_tokens=3), "a")
    model.add_adapter("b", PromptTuningConfig(num_virtual_tokens=6))
    model.add_adapter("frozen_head", PromptTuningConfig(num_virtual_tokens=2, modules_to_save=[]))
    with torch.no_grad():  # give every adapter its own head
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    return model.eval()


def test_adapter_api():
    model = _cls_model()
    assert model.adapter_names == ["a", "b", "frozen_head"]
    assert model.active_adapter == "a"
    model.set_adapter("b")
    ids = torch.randint(4, VOCAB, (1, 5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids, adapter_names=["b"]).logits)
    model.delete_adapter("b")
    assert model.adapter_names == ["a", "frozen_head"] and model.active_adapter == "a"
    with pytest.raises(KeyError, match="no adapter named 'b'"):
        model.set_adapter("b")
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("a", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="not allowed"):
        model.add_adapter("../x", PromptTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names=["a", "a"])
    model.delete_adapter("frozen_head")
    with pytest.raises(ValueError, match="only adapter"):
        model.delete_adapter("a")


def test_mixed_batch_uses_each_rows_prompt_and_head():
    model = _cls_model()
    ids = torch.randint(4, VOCAB, (4, 5))
    names = ["b", "a", "frozen_head", "b"]
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=names).logits
        for i, n in enumerate(names):
            alone = model(input_ids=ids[i : i + 1], adapter_names=[n]).logits
            torch.testing.assert_close(mixed[i], alone[0], atol=1e-5, rtol=0)
    heads = [model.head_modules(n).get("score") for n in ("a", "b", "frozen_head")]
    assert heads[2] is None, "an adapter with a frozen head uses the base model's head"
    assert not torch.equal(heads[0].weight, heads[1].weight)


def test_mixed_batch_gradients_reach_each_adapter_separately():
    model = _cls_model().train()
    ids = torch.randint(4, VOCAB, (2, 5))
    model(input_ids=ids, adapter_names=["a", "a"], labels=torch.tensor([0, 1])).loss.backward()
    assert model.prompts["a"].embedding.grad.abs().sum() > 0
    assert model.prompts["b"].embedding.grad is None


def test_adapters_saved_and_loaded_into_another_model(tmp_path):
    model = _cls_model()
    model.save_pretrained(tmp_path, selected_adapters=["b"])
    other = SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), tmp_path, adapter_name="b")
    other.load_adapter(tmp_path, "b2")
    ids = torch.randint(4, VOCAB, (2, 4))
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names="b").logits
        torch.testing.assert_close(
            other(input_ids=ids, adapter_names=["b", "b2"]).logits, expected, atol=1e-6, rtol=0
        )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_base_rows_and_disable_adapter_give_the_bare_model(arch):
    base = build_model("CAUSAL_LM", arch)
    model = wrap(base, PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.randint(4, VOCAB, (2, 5))
    with torch.no_grad():
        bare = base(input_ids=ids).logits
        mixed = model(input_ids=ids, adapter_names=[BASE, "default"]).logits
        prompted = model(input_ids=ids).logits
        with model.disable_adapter():
            disabled = model(input_ids=ids).logits
    torch.testing.assert_close(mixed[0], bare[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(mixed[1], prompted[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(disabled, bare, atol=1e-5, rtol=0)


def test_logits_to_keep_scores_only_the_last_columns():
    model = wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=3)).eval()
    ids = torch.randint(4, VOCAB, (2, 5))
    labels = torch.full_like(ids, -100)
    labels[:, -1] = ids[:, -1]
    with torch.no_grad():
        full = model(input_ids=ids, labels=labels)
        last = model(input_ids=ids, labels=labels, logits_to_keep=2)
    assert last.logits.shape == (2, 2, VOCAB)
    torch.testing.assert_close(last.logits, full.logits[:, -2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(last.loss, full.loss, atol=1e-6, rtol=0)
