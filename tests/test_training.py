"""Gradients reach only the prompt and new heads; the base model never changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from softprompt import PromptTuningConfig, SoftPromptModel, wrap
from tests.tiny import TASK_ARCHS, VOCAB, build_model


def _batch(task: str, batch: int = 3, length: int = 6) -> dict:
    ids = torch.randint(4, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if task == "CAUSAL_LM":
        out["labels"] = ids
    elif task == "SEQ_2_SEQ_LM":
        out["labels"] = torch.randint(4, VOCAB, (batch, 3))
    elif task == "SEQ_CLS":
        out["labels"] = torch.tensor([0, 2, 1])[:batch]
    elif task == "TOKEN_CLS":
        out["labels"] = torch.randint(0, 3, (batch, length))
    elif task == "QUESTION_ANS":
        out["start_positions"] = torch.tensor([2, 0, 3])[:batch]
        out["end_positions"] = torch.tensor([4, 1, 5])[:batch]
    return out


def _loss(task, out):
    if task == "FEATURE_EXTRACTION":
        return out.last_hidden_state.pow(2).mean()
    return out.loss


@pytest.mark.parametrize("task,arch", TASK_ARCHS)
def test_only_prompt_and_heads_train_and_base_is_bit_identical(task, arch):
    base = build_model(task, arch)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    model = wrap(base, PromptTuningConfig(task_type=task, num_virtual_tokens=3))
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prompts.default.embedding" in trainable
    head_expected = task in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS")
    assert any(".copies.default." in n for n in trainable) == head_expected
    assert all(n == "prompts.default.embedding" or ".copies.default." in n for n in trainable)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(2):
        loss = _loss(task, model(**_batch(task)))
        assert torch.isfinite(loss)
        loss.backward()
        assert model.prompts["default"].embedding.grad.abs().sum() > 0
        opt.step()
        opt.zero_grad()
    after = model.unload().state_dict()
    assert after.keys() == before.keys()
    for k, value in before.items():
        assert torch.equal(value, after[k]), k


def test_head_can_be_frozen():
    model = wrap(
        build_model("SEQ_CLS", "llama"), PromptTuningConfig(num_virtual_tokens=3, modules_to_save=[])
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompts.default.embedding"]
    assert model.peft_config["default"].modules_to_save == []


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_gradient_checkpointing_gives_the_same_gradients(arch):
    task = "SEQ_CLS" if arch == "bert" else "CAUSAL_LM"
    batch = _batch(task)
    grads = []
    calls = [0]

    def count(*_):
        calls[0] += 1

    for checkpointing in (False, True):
        base = build_model(task, arch)
        if checkpointing:
            base.gradient_checkpointing_enable()
        torch.manual_seed(1)
        model = wrap(base, PromptTuningConfig(task_type=task, num_virtual_tokens=3))
        model.train()
        # Checkpointing shows as the layers' leaf modules (Linear, GPT-2's Conv1D, norms...)
        # running again during backward, recomputing the activations that were not kept.
        hooks = [m.register_forward_hook(count) for m in base.modules() if next(m.children(), None) is None]
        loss = model(**batch).loss
        in_forward = calls[0]
        loss.backward()
        recomputed = calls[0] - in_forward
        for h in hooks:
            h.remove()
        assert in_forward > 0
        if checkpointing:
            flags = [m.gradient_checkpointing for m in base.modules() if hasattr(m, "gradient_checkpointing")]
            assert flags and any(flags)
            assert recomputed > 0, "checkpointing did not run: nothing was recomputed during backward"
        else:
            assert recomputed == 0
        grads.append(model.prompts["default"].embedding.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_causal_lm_equals_the_bare_model_fed_the_prompt_by_hand(arch):
    base = build_model("CAUSAL_LM", arch)
    model = wrap(base, PromptTuningConfig(num_virtual_tokens=4)).eval()
    ids = torch.randint(4, VOCAB, (2, 6))
    with torch.no_grad():
        ours = model(input_ids=ids, labels=ids)
        embeds = torch.cat([model.get_prompt().expand(2, -1, -1), base.get_input_embeddings()(ids)], dim=1)
        bare = base(inputs_embeds=embeds).logits  # (2, 10, V)
    torch.testing.assert_close(ours.logits, bare[:, 4:], atol=1e-5, rtol=0)
    # The loss: the last prompt column predicts the first token, then the usual shift.
    expected = F.cross_entropy(bare[:, 3:-1].reshape(-1, VOCAB), ids.reshape(-1))
    torch.testing.assert_close(ours.loss, expected, atol=1e-5, rtol=0)


def test_loss_ignores_labels_at_padding():
    model = wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=4)).eval()
    row = torch.randint(4, VOCAB, (1, 5))
    padded = torch.cat([torch.zeros(1, 2, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = model(input_ids=row, labels=row).loss
        # labels = input_ids including the pad ids, a common mistake: pads are not scored
        padded_loss = model(input_ids=padded, attention_mask=mask, labels=padded).loss
    torch.testing.assert_close(padded_loss, alone, atol=1e-6, rtol=0)


def test_saved_adapter_resumes_training(tmp_path):
    model = wrap(build_model("SEQ_CLS", "llama"), PromptTuningConfig(num_virtual_tokens=3))
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=0.1)
    model(**_batch("SEQ_CLS")).loss.backward()
    opt.step()
    model.save_pretrained(tmp_path)
    resumed = SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), tmp_path, trainable=True)
    assert torch.equal(resumed.get_prompt(), model.get_prompt())
    params = resumed.trainable_parameters()
    assert len(params) == 2  # prompt and the score head
    before = resumed.get_prompt().clone()
    resumed(**_batch("SEQ_CLS")).loss.backward()
    torch.optim.AdamW(params, lr=0.1).step()
    assert not torch.equal(resumed.get_prompt(), before)
    frozen = SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), tmp_path)
    assert frozen.trainable_parameters() == []


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bf16_weight_copies_change_nothing_but_the_casts(arch):
    """Under bf16 autocast, training with bfloat16 copies of the frozen linear weights gives
    bit-identical losses and prompt gradients, and the model gets its own parameters back."""
    from softprompt.core.bf16 import bf16_weight_copies, linear_layers

    torch.manual_seed(0)
    base = build_model("CAUSAL_LM", arch)
    base.config.tie_word_embeddings = True
    base.tie_weights()
    model = wrap(base, PromptTuningConfig(num_virtual_tokens=3))
    before = {n: (p, p.detach().clone()) for n, p in base.named_parameters()}
    ids = torch.randint(4, VOCAB, (2, 6))
    results = []
    for copies in (False, True):
        model.prompts["default"].embedding.grad = None
        with bf16_weight_copies(base, copies), torch.autocast("cpu", dtype=torch.bfloat16):
            if copies:
                linear = linear_layers(base)
                assert linear and all(m.weight.dtype == torch.bfloat16 for m in linear)
                assert base.get_input_embeddings().weight.dtype == torch.float32  # lookups stay exact
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), model.prompts["default"].embedding.grad.clone()))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    after = dict(base.named_parameters())
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value)
    with pytest.raises(RuntimeError), bf16_weight_copies(base, True):
        raise RuntimeError("a failed step")
    assert all(p.dtype == torch.float32 for p in base.parameters())
