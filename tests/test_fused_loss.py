"""The loss-only causal-LM path (`return_logits=False`): the cross-entropy fused with the
output layer gives the default path's loss and prompt gradients without the logits."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from softprompt import BASE, PromptTuningConfig, wrap
from softprompt.core.losses import LinearCrossEntropy, SummedCrossEntropy, linear_output_layer
from tests.test_prefix import _batch
from tests.tiny import PAD, VOCAB, build_model, make_tokenizer

DECODERS = ["gpt2", "llama", "qwen2", "opt", "gpt_neox"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_linear_cross_entropy_equals_the_logits_path(dtype, bias, monkeypatch):
    """Value and gradient of `scale * sum CE(hidden @ W.T + b)` against the same through
    explicit logits and `SummedCrossEntropy`, in several blocks, ignored targets included;
    the incoming gradient scales the gradient computed in the forward."""
    monkeypatch.setattr(LinearCrossEntropy, "MIN_ROWS", 1)
    monkeypatch.setattr(LinearCrossEntropy, "BLOCK_BYTES", 4 * 37 * 3)  # 3 rows a block: 4 blocks
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(11, 8, generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(37, 8, generator=g) * 2).to(dtype)
    b = torch.randn(37, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, 37, (11,), generator=g)
    targets[[0, 4, 10]] = -100
    scale = torch.tensor(1 / 8, dtype=torch.float64)

    ours = LinearCrossEntropy.apply(hidden, weight, b, targets, scale)
    (grad_ours,) = torch.autograd.grad(ours * 0.7, hidden)
    logits = torch.nn.functional.linear(hidden, weight, b)
    want = SummedCrossEntropy.apply(logits, targets) * scale.float()
    (grad_want,) = torch.autograd.grad(want * 0.7, hidden)
    assert ours.dtype == want.dtype and grad_ours.dtype == dtype
    if dtype != torch.bfloat16:
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(grad_ours, grad_want, rtol=1e-5, atol=1e-6)
    else:  # both round differently: neither may be further than the other from float64
        h64 = hidden.detach().double().requires_grad_()
        exact = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(h64, weight.double(), None if b is None else b.double()),
            targets,
            reduction="sum",
        ) * (0.7 / 8)
        (grad_exact,) = torch.autograd.grad(exact, h64)
        torch.testing.assert_close(ours.double() * 0.7, exact, rtol=1e-2, atol=0)
        err = (grad_ours.double() - grad_exact).abs().max()
        assert err <= 2 * (grad_want.double() - grad_exact).abs().max() + 1e-3 * grad_exact.abs().max()
    assert grad_ours[[0, 4, 10]].abs().sum() == 0
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda h: LinearCrossEntropy.apply(h, weight, b, targets, scale),
            (hidden.detach().requires_grad_(),),
        )
    with torch.no_grad():  # no gradient wanted: none computed, the same value
        assert torch.equal(LinearCrossEntropy.apply(hidden, weight, b, targets, scale), ours.detach())


def test_linear_cross_entropy_under_autocast_matches_the_output_layer():
    """Under bfloat16 autocast the logits are computed as the output layer would (bfloat16)."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=g).requires_grad_()
    head = torch.nn.Linear(8, 29, bias=False).requires_grad_(False)
    targets = torch.randint(0, 29, (6,), generator=g)
    scale = torch.tensor(1 / 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = LinearCrossEntropy.apply(hidden, head.weight, None, targets, scale)
        want = SummedCrossEntropy.apply(head(hidden), targets) / 6
    (g_ours,) = torch.autograd.grad(ours, hidden)
    (g_want,) = torch.autograd.grad(want, hidden)
    torch.testing.assert_close(ours, want, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(g_ours, g_want, rtol=2e-2, atol=2e-3)


def _model(arch: str, prefix_cache: bool = True):
    torch.manual_seed(0)
    model = wrap(
        build_model("CAUSAL_LM", arch), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5), "a"
    )
    model.add_adapter("b", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    model.prefix_cache = prefix_cache
    return model.train()


def _head_rows(model):
    """Record how many positions each call of the output layer scores."""
    rows = []
    head = model.base_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda mod, args, out: rows.append(out.shape[:-1].numel()))
    return rows, handle


def _loss_and_grads(model, ids, mask, labels, **kw):
    out = model(input_ids=ids, attention_mask=mask, labels=labels, **kw)
    prompts = [model.prompts[n].embedding for n in ("a", "b")]
    grads = torch.autograd.grad(out.loss, prompts, allow_unused=True)
    return out, [g for g in grads if g is not None]


@pytest.mark.parametrize("prefix_cache", [True, False])
@pytest.mark.parametrize("arch", DECODERS)
def test_loss_only_path_matches_the_default(arch, prefix_cache):
    """Loss and prompt gradients equal the default path's for one adapter and mixed adapters
    (rows without a prompt, padding on either side, ignored labels), with and without the
    cached prompt; the output layer never scores the batch and `logits` is None."""
    model = _model(arch, prefix_cache)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 2] = -100
    assert linear_output_layer(model.base_model) is model.base_model.get_output_embeddings()
    for names in ("a", ["a", "b", BASE], ["b", "b", "a"]):
        want, want_grads = _loss_and_grads(model, ids, mask, labels, adapter_names=names)
        rows, handle = _head_rows(model)
        got, got_grads = _loss_and_grads(model, ids, mask, labels, adapter_names=names, return_logits=False)
        handle.remove()
        assert got.logits is None
        assert all(r <= len(ids) for r in rows), rows  # at most the prompts' last tokens
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        assert len(got_grads) == len(want_grads)
        for a, b in zip(got_grads, want_grads):
            assert b.abs().sum() > 0
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("keep", [3, torch.tensor([1, 4, 6])])
def test_loss_only_with_logits_to_keep_and_items_in_batch(keep):
    """`logits_to_keep` (the generation objective's) and `num_items_in_batch` (gradient
    accumulation) act as on the default path."""
    model = _model("llama")
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    for kw in ({"logits_to_keep": keep}, {"logits_to_keep": keep, "num_items_in_batch": 13}):
        want, want_grads = _loss_and_grads(model, ids, mask, labels, **kw)
        got, got_grads = _loss_and_grads(model, ids, mask, labels, return_logits=False, **kw)
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_loss_only_without_gradients_and_in_eval_mode():
    model = _model("qwen2").eval()
    ids, mask = _batch()
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, labels=ids)
        got = model(input_ids=ids, attention_mask=mask, labels=ids, return_logits=False)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)


def test_output_layers_that_do_more_keep_the_model_path():
    """Gemma-2 soft-caps its logits after the output layer: the loss-only request still gives
    the model's own loss (through its logits), found out by comparing, not by name."""
    cfg = T.Gemma2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=VOCAB,
        pad_token_id=PAD,
        final_logit_softcapping=0.5,  # small enough to change every logit
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    base = T.Gemma2ForCausalLM(cfg).eval()
    assert linear_output_layer(base) is None
    model = wrap(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).train()
    ids, mask = _batch()
    want = model(input_ids=ids, attention_mask=mask, labels=ids)
    got = model(input_ids=ids, attention_mask=mask, labels=ids, return_logits=False)
    torch.testing.assert_close(got.loss, want.loss)
    assert base.training  # the check restored every module's mode


def test_the_generation_objective_trains_without_logits():
    """The trainer's generation objective asks for the loss only, and gets the default loss."""
    from softprompt.scoring.objectives import GenerationObjective

    tok = make_tokenizer()
    objective = GenerationObjective.build(
        tok, ["good movie", "the plot was boring"], ["positive", "negative"], "review {text} sentiment", 32
    )
    model = _model("llama")
    linear_output_layer(model.base_model)  # its one-off check scores a few tokens
    rows, handle = _head_rows(model)
    loss = objective.loss(model, [0, 1])
    handle.remove()
    assert all(r <= 2 for r in rows), rows
    seqs = [objective.prompts[i] + objective.targets[i] for i in (0, 1)]
    width = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (width - len(s)) + s for s in seqs])
    mask = (torch.arange(width) >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
    labels = torch.full_like(ids, -100)
    for row, i in enumerate((0, 1)):
        n = len(objective.targets[i])
        labels[row, width - n :] = ids[row, width - n :]
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(loss, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("copies", [False, True])
def test_loss_only_under_bfloat16_autocast(copies):
    """The trainer's bf16 run (autocast, optionally bfloat16 copies of the frozen weights):
    the loss-only path scores the logits in bfloat16 as the output layer would."""
    from softprompt.core.bf16 import bf16_weight_copies

    model = _model("llama")
    ids, mask = _batch()
    results = []
    for return_logits in (True, False):
        with bf16_weight_copies(model.base_model, copies), torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_loss_and_grads(model, ids, mask, ids, return_logits=return_logits))
    (want, want_grads), (got, got_grads) = results
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-2, atol=1e-3)
    for a, b in zip(got_grads, want_grads, strict=True):
        assert (a - b).abs().max() <= 1e-2 * b.abs().max()


def _first_layer_inputs(model):
    """Record the (batch, columns) the first transformer layer is fed on each call."""
    seen = []
    layers = next(m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList))

    def hook(mod, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(tuple(hidden.shape[:2]))

    return seen, layers[0].register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("arch", DECODERS)
def test_loss_only_training_packs_prompt_and_batch_into_one_pass(arch):
    """A loss-only training call of one prompt runs one pass over `[prompt][row 1]...[row B]`
    (no pass of the prompt's own) and gives the default path's loss and prompt gradient;
    mixed prompts, inference and calls that want logits keep their own passes."""
    model = _model(arch)
    ids, mask = _batch()
    labels = ids.masked_fill(mask == 0, -100)
    batch, length = ids.shape
    linear_output_layer(model.base_model)
    for names, packed in (("a", True), ("b", True), (["a", "b", "a"], False)):
        want, want_grads = _loss_and_grads(model, ids, mask, labels, adapter_names=names)
        seen, handle = _first_layer_inputs(model)
        got, got_grads = _loss_and_grads(model, ids, mask, labels, adapter_names=names, return_logits=False)
        handle.remove()
        if packed:
            assert seen == [(1, model.prompts[names].num_virtual_tokens + batch * length)], seen
        else:  # each prompt's own pass, then the batch
            assert seen[-1] == (batch, length) and len(seen) == 3, seen
        torch.testing.assert_close(got.loss, want.loss, rtol=1e-6, atol=1e-6)
        for a, b in zip(got_grads, want_grads, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    seen, handle = _first_layer_inputs(model)
    with torch.no_grad():  # nothing to train: the prompt KV (remembered), the batch alone
        model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=False)
    handle.remove()
    assert seen == [(1, 5), (batch, length)], seen


def test_packed_bfloat16_pass_matches_the_cached_prompt_pass(monkeypatch):
    """In bfloat16 the packed pass's rows attend over aligned key lengths (see
    `attention.key_padding`) and match the cached prompt's pass up to bfloat16 rounding."""
    from softprompt.core import attention

    torch.manual_seed(0)
    model = wrap(
        build_model("CAUSAL_LM", "llama").to(torch.bfloat16),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5),
    ).train()
    ids, mask = _batch()
    sdpa = torch.nn.functional.scaled_dot_product_attention
    keys = []

    def spy(query, key, value, *args, **kw):
        keys.append(key.shape[2])
        return sdpa(query, key, value, *args, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    results = []
    for pack in (True, False):
        keys.clear()
        with monkeypatch.context() as m:
            if not pack:
                m.setattr(attention, "supports_packing", lambda model: False)
            out = model(input_ids=ids, attention_mask=mask, labels=ids, return_logits=False)
        (grad,) = torch.autograd.grad(out.loss, [model.prompts["default"].embedding])
        results.append((out.loss, grad))
        assert 16 in keys and not {k for k in keys if k > 5} - {16}, keys  # 5 + 7 keys -> 16
    (packed, g_packed), (cached, g_cached) = results
    torch.testing.assert_close(packed, cached, rtol=1e-2, atol=1e-2)
    assert (g_packed - g_cached).abs().max() <= 3e-2 * g_cached.abs().max()


@pytest.mark.parametrize("arch", DECODERS)
def test_the_last_columns_logits_come_from_a_contiguous_copy(arch):
    """`logits_to_keep=k` (rank classification asks for 1): the output layer gets the last
    columns' hidden states as one contiguous `(B, k, H)` block (transformers slices a view,
    which torch multiplies as B products with B copies of the weight: 0.5 s instead of
    about 20 ms on an AVX2 EPYC for SmolLM2), and the logits and prompt gradients are those
    of the model's own forward (all columns, then the last k); mixed adapters, padding on
    either side, bare rows."""
    model = _model(arch)
    ids, mask = _batch()
    head = model.base_model.get_output_embeddings()
    seen = []

    def record(mod, args):
        seen.append((tuple(args[0].shape), args[0].is_contiguous()))

    for keep in (1, 2):
        for names in ("a", ["a", "b", BASE]):
            seen.clear()
            handle = head.register_forward_pre_hook(record)
            got = model(input_ids=ids, attention_mask=mask, adapter_names=names, logits_to_keep=keep).logits
            handle.remove()
            assert [s for s, _ in seen if s[0] == len(ids)] == [(len(ids), keep, head.in_features)], seen
            assert all(contiguous for _, contiguous in seen), seen
            (got_grad,) = torch.autograd.grad(got.square().sum(), model.prompts["a"].embedding)
            full = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
            want = full[:, -keep:]
            (want_grad,) = torch.autograd.grad(want.square().sum(), model.prompts["a"].embedding)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
