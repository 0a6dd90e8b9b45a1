"""The prompt's KV computed once equals the plain path: logits, losses, gradients, generations."""

from __future__ import annotations

import pytest
import torch

from softprompt import BASE, PromptTuningConfig, wrap
from softprompt.core.prefix import supports_prefix_cache
from tests.tiny import PAD, TASK_ARCHS, VOCAB, build_model

DECODERS = ["gpt2", "llama", "qwen2", "opt", "gpt_neox"]
ATOL = 1e-5


def _pair(task: str, arch: str):
    """The same adapters on two copies of one model: prompt KV cached, and plain."""
    models = []
    for prefix in (True, False):
        torch.manual_seed(0)
        model = wrap(build_model(task, arch), PromptTuningConfig(task_type=task, num_virtual_tokens=5), "a")
        model.add_adapter("b", PromptTuningConfig(task_type=task, num_virtual_tokens=2))
        model.prefix_cache = prefix
        models.append(model.eval())
    assert torch.equal(models[0].get_prompt("b"), models[1].get_prompt("b"))
    return models


def _batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, VOCAB, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    mask[2, 5:] = 0  # right padding
    ids[mask == 0] = PAD
    return ids, mask


def _widths(model):
    """Record how many columns the first transformer layer is fed on each call."""
    seen = []
    layers = next(m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList))

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden.shape[1])

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("arch", DECODERS)
def test_supported_decoders_use_the_cache_and_match_the_plain_path(arch):
    cached, plain = _pair("CAUSAL_LM", arch)
    assert supports_prefix_cache(cached.base_model)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    names = ["a", "b", BASE]
    seen, handle = _widths(cached)
    with torch.no_grad():
        got = cached(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
        want = plain(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
    handle.remove()
    assert seen[-1] == ids.shape[1], "the model must be fed the user's columns only"
    torch.testing.assert_close(got.logits, want.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, want.loss, atol=ATOL, rtol=0)


def _train_step(model, ids, mask, names):
    """One training forward and backward: the loss and the prompt gradients of "a" and "b"."""
    model.train()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=names).loss
    loss.backward()
    return loss.detach(), [model.prompts[n].embedding.grad.clone() for n in ("a", "b")]


@pytest.mark.parametrize("arch", DECODERS)
def test_training_loss_and_prompt_gradient_match(arch):
    cached, plain = _pair("CAUSAL_LM", arch)
    ids, mask = _batch()
    results, widths = [], []
    for model in (cached, plain):
        seen, handle = _widths(model)
        results.append(_train_step(model, ids, mask, ["a", "a", "b"]))
        handle.remove()
        widths.append(seen)
    # the cached path: prompt passes (5 and 2 columns), then the user's 7 columns only;
    # the plain path: one pass over the widest prompt and the user's columns
    assert widths[0][-1] == ids.shape[1] and max(widths[0]) == ids.shape[1], widths[0]
    assert widths[1] == [ids.shape[1] + 5], widths[1]
    losses, grads = zip(*results)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    for g_cached, g_plain in zip(*grads):
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_cached, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_grouped_query_attention_attends_on_the_key_value_heads(arch, monkeypatch):
    """With a cached prompt on CPU, grouped-query models attend with `enable_gqa` (no copy of
    the keys/values per query head), match the plain path, and keep their own attention setting."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def spy(query, key, value, **kw):
        calls.append((query.shape[2], key.shape[1] < query.shape[1], kw.get("enable_gqa", False)))
        return sdpa(query, key, value, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    cached, plain = _pair("CAUSAL_LM", arch)
    assert cached.base_model.config._attn_implementation == "sdpa"
    ids, mask = _batch()
    losses, grads = [], []
    for model in (cached, plain):
        calls.clear()
        loss, grad = _train_step(model, ids, mask, ["a", "b", "a"])
        losses.append(loss)
        grads.append(grad)
        # (query length, fewer key heads than query heads, enable_gqa) of the batch's passes
        # (the longest queries; the cached prompt passes are shorter)
        users = [c for c in calls if c[0] == max(q for q, _, _ in calls)]
        assert users and users[0][0] == ids.shape[1] + (0 if model is cached else 5)
        if model is cached:
            assert all(fewer and gqa for _, fewer, gqa in users), (
                "the user's pass must attend on the KV heads"
            )
        else:
            assert not any(
                gqa for _, _, gqa in users
            )  # the plain path, masked: transformers copies the heads
    assert cached.base_model.config._attn_implementation == "sdpa"
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for g_cached, g_plain in zip(*grads):
        torch.testing.assert_close(g_cached, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("task", ["SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"])
def test_other_decoder_tasks_match(task):
    cached, plain = _pair(task, "llama")
    ids, mask = _batch()
    extra = {
        "SEQ_CLS": {"labels": torch.tensor([0, 1, 2])},
        "TOKEN_CLS": {"labels": torch.randint(0, 3, ids.shape)},
        "QUESTION_ANS": {
            "start_positions": torch.tensor([3, 1, 0]),
            "end_positions": torch.tensor([5, 2, 4]),
        },
        "FEATURE_EXTRACTION": {},
    }[task]
    with torch.no_grad():
        got = cached(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "a"], **extra)
        want = plain(input_ids=ids, attention_mask=mask, adapter_names=["a", "b", "a"], **extra)
    for key in ("logits", "start_logits", "end_logits", "last_hidden_state", "loss"):
        if key in want and want[key] is not None:
            g, w = got[key], want[key]
            if task in ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION") and key != "loss":
                g, w = g[mask.bool()], w[mask.bool()]  # padded columns hold no meaning
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0)


# Decoders take the cached path for every task, except GPT-2's QA model, whose forward has no
# `past_key_values` argument; encoders and encoder-decoders always take the plain path.
CACHED = {(t, a) for t, a in TASK_ARCHS if a in DECODERS} - {("QUESTION_ANS", "gpt2")}


def _task_extra(task: str, ids: torch.Tensor) -> dict:
    batch = ids.shape[0]
    return {
        "CAUSAL_LM": {"labels": ids},
        "SEQ_2_SEQ_LM": {"labels": torch.randint(4, VOCAB, (batch, 4))},
        "SEQ_CLS": {"labels": torch.tensor([0, 1, 2])[:batch]},
        "TOKEN_CLS": {"labels": torch.randint(0, 3, ids.shape)},
        "QUESTION_ANS": {
            "start_positions": torch.tensor([3, 1, 0]),
            "end_positions": torch.tensor([5, 2, 4]),
        },
        "FEATURE_EXTRACTION": {},
    }[task]


@pytest.mark.parametrize("task,arch", TASK_ARCHS)
def test_training_takes_the_cached_path_exactly_where_supported(task, arch):
    """Every task on every architecture, in training: the cached path (the layers see the
    prompts alone, then the user's columns only) where the architecture supports it, the plain
    path (prompt and user's columns together) elsewhere; the same loss and gradients either way."""
    cached, plain = _pair(task, arch)
    assert supports_prefix_cache(cached.base_model) == ((task, arch) in CACHED)
    ids, mask = _batch()
    names = ["a", "a", "b"]
    torch.manual_seed(2)
    extra = _task_extra(task, ids)
    results, widths = [], []
    for model in (cached, plain):
        model.train()
        for m in model.modules():  # the token-classification heads' dropout draws differ per path
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        seen, handle = _widths(model)
        out = model(input_ids=ids, attention_mask=mask, adapter_names=names, **extra)
        loss = out.last_hidden_state[mask.bool()].pow(2).mean() if task == "FEATURE_EXTRACTION" else out.loss
        loss.backward()
        handle.remove()
        results.append((loss.detach(), [model.prompts[n].embedding.grad.clone() for n in ("a", "b")]))
        widths.append(seen)
    assert model.uses_prompt_cache(names, 3) is False  # the plain copy
    assert cached.uses_prompt_cache(names, 3) is ((task, arch) in CACHED)
    if (task, arch) in CACHED:
        assert widths[0][-1] == ids.shape[1] and max(widths[0]) == ids.shape[1], widths[0]
        assert sorted(set(widths[0][:-1])) in ([2, 5], [5]), "the prompt passes"
    else:
        assert widths[0] == [ids.shape[1] + 5], widths[0]
    assert widths[1] == [ids.shape[1] + 5], widths[1]
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-6)
    for g_cached, g_plain in zip(results[0][1], results[1][1]):
        assert g_plain.abs().sum() > 0
        torch.testing.assert_close(g_cached, g_plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", DECODERS)
def test_generate_greedy_and_sampled_match(arch):
    cached, plain = _pair("CAUSAL_LM", arch)
    ids, mask = _batch()
    ids, mask = ids[:2], mask[:2]  # decoder generation wants left padding
    kw = {
        "input_ids": ids,
        "attention_mask": mask,
        "adapter_names": ["a", "b"],
        "max_new_tokens": 5,
        "min_new_tokens": 5,
    }
    assert torch.equal(cached.generate(**kw, do_sample=False), plain.generate(**kw, do_sample=False))
    outs = []
    for model in (cached, plain):
        torch.manual_seed(11)
        outs.append(model.generate(**kw, do_sample=True, top_k=0, temperature=1.0))
    assert torch.equal(outs[0], outs[1])
    beams = [m.generate(**kw, num_beams=3, num_return_sequences=2, do_sample=False) for m in (cached, plain)]
    assert torch.equal(beams[0], beams[1])


def test_prompt_kv_is_computed_once_for_inference_and_again_after_an_update():
    model = wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=4)).eval()
    ids = torch.randint(4, VOCAB, (2, 5))
    seen, handle = _widths(model)
    with torch.no_grad():
        model(input_ids=ids)
        model(input_ids=ids)
    assert seen == [4, 5, 5], "one prompt pass (4 columns), then the user's 5 columns per call"
    with torch.no_grad():
        model.prompts["default"].embedding.add_(0.1)  # e.g. an optimizer step
        model(input_ids=ids)
    handle.remove()
    assert seen[3:] == [4, 5]


@pytest.mark.parametrize("arch", DECODERS)
def test_several_prompts_computed_in_one_pass_equal_each_alone(arch):
    """`PromptKV.compute_missing` (the server's misses at once): one pass, each state as alone."""
    together, alone = _pair("CAUSAL_LM", arch)
    c = torch.randn(3, 32, generator=torch.Generator().manual_seed(3))
    for model in (together, alone):
        model.add_adapter("c", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
        model.prompts["c"].embedding.data.copy_(c)
    store = together.prompt_kv
    dtype = torch.float32
    with torch.no_grad():
        store.get(together, "b", dtype, False)  # remembered: not computed again
        seen, handle = _widths(together)
        assert store.compute_missing(together, ["a", "c", "b", "a"], dtype) == 2
        assert store.compute_missing(together, ["a", "c"], dtype) == 0
        handle.remove()
        assert seen == [5], "a (5 tokens) and c (3), one pass"
        assert store.misses == 3 and len(store) == 3
        hits = store.hits
        for name in ("a", "c"):  # the requests whose misses were computed ahead: not hits too
            store.get(together, name, dtype, False)
        assert store.hits == hits
        for name in ("a", "b", "c"):
            got = store.get(together, name, dtype, False).kv
            want = alone.prompt_kv.get(alone, name, dtype, False).kv
            assert [k.shape for k, _ in got] == [k.shape for k, _ in want]
            for (k1, v1), (k2, v2) in zip(got, want):
                torch.testing.assert_close(k1, k2, atol=ATOL, rtol=1e-5)
                torch.testing.assert_close(v1, v2, atol=ATOL, rtol=1e-5)
        assert store.hits == hits + 3
        ids, mask = _batch()
        logits = together(input_ids=ids, attention_mask=mask, adapter_names=["a", "c", "b"]).logits
        want = alone(input_ids=ids, attention_mask=mask, adapter_names=["a", "c", "b"]).logits
    torch.testing.assert_close(logits[mask.bool()], want[mask.bool()], atol=ATOL, rtol=1e-5)


def test_prompt_changed_through_data_is_not_served_stale():
    """`.data` writes bypass the version counter; the cache must still notice them."""
    cached, plain = _pair("CAUSAL_LM", "llama")
    ids, mask = _batch()
    with torch.no_grad():
        cached(input_ids=ids, attention_mask=mask, adapter_names="a")  # remembers a's KV
        for model in (cached, plain):
            model.prompts["a"].embedding.data.mul_(-2.0)
        got = cached(input_ids=ids, attention_mask=mask, adapter_names="a").logits
        want = plain(input_ids=ids, attention_mask=mask, adapter_names="a").logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_fallbacks():
    for task, arch in [
        ("SEQ_2_SEQ_LM", "t5"),
        ("SEQ_2_SEQ_LM", "bart"),
        ("SEQ_CLS", "bert"),
        ("FEATURE_EXTRACTION", "roberta"),
    ]:
        assert not supports_prefix_cache(build_model(task, arch)), (task, arch)
    sliding = build_model(
        "CAUSAL_LM", "qwen2", use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention"] * 2
    )
    assert not supports_prefix_cache(sliding)
    # gradient checkpointing during training: the plain path, same gradients (see test_training)
    model = wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=3))
    model.base_model.gradient_checkpointing_enable()
    model.train()
    seen, handle = _widths(model)
    model(input_ids=torch.randint(4, VOCAB, (2, 5))).logits.sum().backward()
    handle.remove()
    assert seen == [8]


def test_full_sequence_uses_the_plain_path():
    model = wrap(build_model("CAUSAL_LM", "gpt2"), PromptTuningConfig(num_virtual_tokens=3)).eval()
    with torch.no_grad():
        out = model(input_ids=torch.randint(4, VOCAB, (1, 5)), full_sequence=True)
    assert out.logits.shape[1] == 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_additive_mask_and_uncopied_cache_are_bit_identical(arch, dtype, monkeypatch):
    """The cached-prompt path's two shortcuts - transformers' sdpa mask made additive once per
    pass (grouped-query models on CPU), and a cache that holds the prompt KV without copying
    it - give exactly the losses, logits and prompt gradients of the boolean mask and a cache
    built from data, for one adapter (broadcast KV), mixed adapters and inference."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    from softprompt.core import attention, prefix

    sdpa = torch.nn.functional.scaled_dot_product_attention
    masks = []

    def spy(query, key, value, attn_mask=None, **kw):
        masks.append(None if attn_mask is None else attn_mask.dtype)
        return sdpa(query, key, value, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    torch.manual_seed(0)
    model = wrap(
        build_model("CAUSAL_LM", arch).to(dtype),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
        "a",
    )
    model.add_adapter("b", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)

    def run() -> list[torch.Tensor]:
        out = []
        for names in ("a", ["a", "b", "a"]):
            model.train()
            res = model(input_ids=ids, attention_mask=mask, labels=labels, adapter_names=names)
            prompts = [model.prompts[n].embedding for n in ("a", "b")]
            grads = torch.autograd.grad(res.loss, prompts, allow_unused=True)
            out += [res.loss.detach(), res.logits.detach()] + [g for g in grads if g is not None]
            model.eval()
            with torch.no_grad():
                out.append(model(input_ids=ids, attention_mask=mask, adapter_names=names).logits)
        return out

    masks.clear()
    new = run()
    if arch != "gpt2":  # grouped-query: the user's passes get the additive mask
        assert dtype in masks and torch.bool not in masks, masks
    try:
        monkeypatch.setattr(prefix, "_cache_holding", prefix.make_cache)
        AttentionMaskInterface.register(attention.PREFIX_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
        model.clear_prompt_cache()
        masks.clear()
        old = run()
        if arch != "gpt2":
            assert torch.bool in masks, masks
    finally:
        attention._register_prefix_attention.cache_clear()
        attention._register_prefix_attention()
    assert len(new) == len(old)
    for a, b in zip(new, old):
        assert a.dtype == b.dtype and torch.equal(a, b)
