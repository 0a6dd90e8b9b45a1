"""generate() through prompts: equals a no-cache step-by-step reference, padded and mixed
batches equal single runs, no prompt re-insertion in hand-written loops."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptTuningConfig, wrap
from tests.tiny import EOS, PAD, VOCAB, build_model

DECODERS = ["gpt2", "llama", "qwen2", "opt", "gpt_neox"]
NEW = 6  # generate calls pass min_new_tokens=NEW so that an early EOS cannot shorten a row


def _model(arch: str, task: str = "CAUSAL_LM"):
    model = wrap(build_model(task, arch), PromptTuningConfig(task_type=task, num_virtual_tokens=4), "a")
    model.add_adapter(
        "b", PromptTuningConfig(task_type=task, num_virtual_tokens=7, prompt_tuning_init="SAMPLE_VOCAB")
    )
    return model.eval()


def _left_padded(rows):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def _reference_greedy(model, ids, adapter, steps):
    """No cache: rerun the whole sequence through the prompted model at every step."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=seq, adapter_names=[adapter]).logits[:, -1]
            logits[:, EOS] = float("-inf")  # what min_new_tokens does
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("arch", DECODERS)
def test_greedy_generate_equals_no_cache_reference(arch):
    model = _model(arch)
    ids = torch.randint(4, VOCAB, (1, 5))
    got = model.generate(
        input_ids=ids, adapter_names="b", max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
    )
    assert torch.equal(got, _reference_greedy(model, ids, "b", NEW))


@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_mixed_batch_generate_equals_single_runs(arch):
    model = _model(arch)
    rows = [torch.randint(4, VOCAB, (n,)) for n in (3, 6, 4)]
    names = ["a", "b", "b"]
    ids, mask = _left_padded(rows)
    batch = model.generate(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=names,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
    )
    assert batch.shape == (3, ids.shape[1] + NEW)
    assert torch.equal(batch[:, : ids.shape[1]], ids), "outputs start with the user's ids, no virtual tokens"
    for i, (r, n) in enumerate(zip(rows, names)):
        single = model.generate(
            input_ids=r.unsqueeze(0), adapter_names=n, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
        )
        assert torch.equal(batch[i, -NEW:], single[0, -NEW:])


def test_sampling_equals_a_manual_sampling_loop():
    model = _model("llama")
    ids = torch.randint(4, VOCAB, (1, 4))
    torch.manual_seed(123)
    got = model.generate(
        input_ids=ids,
        adapter_names="a",
        max_new_tokens=NEW,
        do_sample=True,
        top_k=0,
        top_p=1.0,
        temperature=0.7,
        min_new_tokens=NEW,
    )
    torch.manual_seed(123)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(NEW):
            logits = model(input_ids=seq, adapter_names=["a"]).logits[:, -1] / 0.7
            logits[:, EOS] = float("-inf")
            nxt = torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq)


def test_generate_from_inputs_embeds():
    model = _model("gpt2")
    ids = torch.randint(4, VOCAB, (1, 5))
    embeds = model.base_model.get_input_embeddings()(ids)
    from_embeds = model.generate(
        inputs_embeds=embeds, adapter_names="a", max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
    )
    from_ids = model.generate(
        input_ids=ids, adapter_names="a", max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
    )
    assert from_embeds.shape == (1, NEW)  # as for the bare model: new tokens only
    assert torch.equal(from_embeds[0], from_ids[0, -NEW:])


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hand_written_loop_with_cache_does_not_reinsert_the_prompt(arch):
    model = _model(arch)
    ids = torch.randint(4, VOCAB, (2, 5))
    ids[0, :2] = PAD
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names=["a", "b"], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        seq, m = ids, mask
        for _ in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            out = model(
                input_ids=nxt,
                attention_mask=m,
                adapter_names=["a", "b"],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.cache if hasattr(out, "cache") else out.past_key_values
            full = model(input_ids=seq, attention_mask=m, adapter_names=["a", "b"]).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=0)
        assert cache.get_seq_length() == 7 + ids.shape[1] + 3  # prompt width + user tokens, once


@pytest.mark.parametrize("arch", ["t5", "bart"])
def test_seq2seq_generate_padded_batch_equals_single_runs(arch):
    model = _model(arch, "SEQ_2_SEQ_LM")
    rows = [torch.randint(4, VOCAB, (n,)) for n in (3, 6)]
    for side in ("left", "right"):
        width = 6
        ids = torch.full((2, width), PAD)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl], mask[i, sl] = r, 1
        batch = model.generate(
            input_ids=ids,
            attention_mask=mask,
            adapter_names=["a", "b"],
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
        )
        for i, (r, n) in enumerate(zip(rows, ["a", "b"])):
            single = model.generate(
                input_ids=r.unsqueeze(0),
                adapter_names=n,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                do_sample=False,
            )
            assert torch.equal(batch[i], single[0])


def test_generate_refuses_non_generative_task():
    model = wrap(build_model("SEQ_CLS", "llama"), PromptTuningConfig(num_virtual_tokens=3))
    with pytest.raises(ValueError, match="CAUSAL_LM or SEQ_2_SEQ_LM"):
        model.generate(input_ids=torch.tensor([[5, 6]]))
