"""Initialisation strategies, checked against the embedding table by hand."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptTuningConfig, wrap
from softprompt.core.init import init_text
from tests.tiny import BOS, EOS, PAD, UNK, build_model

SPECIAL = {PAD, UNK, BOS, EOS}


def _table(model):
    return model.base_model.get_input_embeddings().weight.detach()


def test_text_init_repeats_the_text_tokens(tokenizer, tokenizer_dir):
    cfg = PromptTuningConfig(
        num_virtual_tokens=7,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="classify the review",
        tokenizer_name_or_path=tokenizer_dir,
    )
    model = wrap(build_model("CAUSAL_LM", "llama"), cfg)  # tokenizer loaded from the folder
    ids = tokenizer("classify the review", add_special_tokens=False)["input_ids"]
    expected = _table(model)[torch.tensor((ids * 3)[:7])]
    assert torch.equal(model.get_prompt(), expected)


def test_text_init_truncates(tokenizer):
    cfg = PromptTuningConfig(
        num_virtual_tokens=2,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="good bad great",
        tokenizer_name_or_path="unused",
    )
    model = wrap(build_model("CAUSAL_LM", "gpt2"), cfg, tokenizer=tokenizer)
    ids = tokenizer("good bad", add_special_tokens=False)["input_ids"]
    assert torch.equal(model.get_prompt(), _table(model)[torch.tensor(ids)])


def test_text_that_tokenizes_to_nothing_is_a_clear_error(tokenizer):
    model = build_model("CAUSAL_LM", "gpt2")
    with pytest.raises(ValueError, match="tokenizes to no tokens"):
        init_text(3, model.get_input_embeddings(), tokenizer, "")


def test_sample_vocab_never_draws_special_or_padding_tokens(tokenizer):
    model = wrap(
        build_model("CAUSAL_LM", "llama"),
        PromptTuningConfig(num_virtual_tokens=30, prompt_tuning_init="SAMPLE_VOCAB"),
        tokenizer=tokenizer,
    )
    table = _table(model)
    prompt = model.get_prompt()
    # Each row is exactly one row of the table; find which.
    drawn = [int((table == row).all(dim=1).nonzero()[0]) for row in prompt]
    assert not set(drawn) & SPECIAL
    assert all(i < len(tokenizer) for i in drawn), "ids beyond the tokenizer are untrained padding rows"
    assert len(set(drawn)) == 30, "distinct tokens while the vocabulary allows it"


def test_sample_vocab_without_tokenizer_skips_config_special_ids():
    # Without a tokenizer only the ids named in the model config are known to be special.
    for _ in range(5):
        model = wrap(
            build_model("CAUSAL_LM", "llama"),
            PromptTuningConfig(num_virtual_tokens=90, prompt_tuning_init="SAMPLE_VOCAB"),
        )
        table = _table(model)
        drawn = {int((table == row).all(dim=1).nonzero()[0]) for row in model.get_prompt()}
        assert not drawn & {PAD, BOS, EOS}


def test_sample_vocab_loads_the_named_tokenizer(tokenizer_dir):
    cfg = PromptTuningConfig(
        num_virtual_tokens=30, prompt_tuning_init="SAMPLE_VOCAB", tokenizer_name_or_path=tokenizer_dir
    )
    model = wrap(build_model("CAUSAL_LM", "llama"), cfg)
    table = _table(model)
    drawn = {int((table == row).all(dim=1).nonzero()[0]) for row in model.get_prompt()}
    assert not drawn & SPECIAL and max(drawn) < 36


def test_random_init_matches_the_embedding_scale():
    model = wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=2000))
    table = _table(model)[4:]
    prompt = model.get_prompt()
    assert prompt.dtype == torch.float32
    ratio = prompt.norm(dim=1).mean() / table.norm(dim=1).mean()
    assert 0.8 < ratio < 1.25
    assert (prompt.mean(0) - table.mean(0)).abs().max() < 0.01


def test_random_init_uses_each_dimension_s_own_mean_and_std():
    """Columns of very different means and scales: every dimension of a large random prompt
    has its own column's mean and std (one global std, or N(0, 1), fails by far)."""
    base = build_model("CAUSAL_LM", "llama")
    table = base.get_input_embeddings().weight  # (VOCAB, 32)
    hidden = table.shape[1]
    g = torch.Generator().manual_seed(0)
    mean = torch.linspace(-3.0, 3.0, hidden)[torch.randperm(hidden, generator=g)]
    std = torch.logspace(-2, 0.5, hidden)[torch.randperm(hidden, generator=g)]  # 0.01 ... 3.2
    ordinary = torch.randn(table.shape[0] - 4, hidden, generator=g)
    ordinary = (ordinary - ordinary.mean(0)) / ordinary.std(0, unbiased=False)  # exactly 0 / 1
    # the 4 special rows at mean +- std: the column statistics are exactly (mean, std)
    # whether or not the init counts them among the ordinary tokens
    special = torch.tensor([[1.0], [1.0], [-1.0], [-1.0]]).expand(4, hidden)
    with torch.no_grad():
        table.copy_(mean + std * torch.cat([special, ordinary]))
    torch.testing.assert_close(table.std(0, unbiased=False), std, rtol=1e-4, atol=0)
    torch.manual_seed(1)
    prompt = wrap(base, PromptTuningConfig(num_virtual_tokens=4000)).get_prompt()  # (4000, 32)
    # 4000 draws: the std's relative error is about 1.1%, the mean's 1.6% of the std
    ratio = prompt.std(0) / std
    assert ((ratio > 0.93) & (ratio < 1.07)).all(), ratio
    assert ((prompt.mean(0) - mean).abs() < 0.1 * std).all(), (prompt.mean(0) - mean) / std


def test_class_labels_init(tokenizer):
    labels = ["positive", "not fun"]  # the second is two tokens: averaged
    cfg = PromptTuningConfig(
        num_virtual_tokens=5,
        prompt_tuning_init="CLASS_LABELS",
        prompt_tuning_init_text=labels,
        tokenizer_name_or_path="unused",
    )
    model = wrap(build_model("CAUSAL_LM", "llama"), cfg, tokenizer=tokenizer)
    table, prompt = _table(model), model.get_prompt()
    pos = tokenizer("positive", add_special_tokens=False)["input_ids"]
    two = tokenizer("not fun", add_special_tokens=False)["input_ids"]
    assert len(two) == 2
    torch.testing.assert_close(prompt[0], table[pos[0]])
    torch.testing.assert_close(prompt[1], table[torch.tensor(two)].mean(0))
    for row in prompt[2:]:
        hits = (table == row).all(dim=1).nonzero().flatten().tolist()
        assert hits and hits[0] not in SPECIAL


@pytest.mark.parametrize("init", ["RANDOM", "SAMPLE_VOCAB"])
def test_init_is_reproducible_with_the_global_seed(init):
    """The global seed set just before `wrap` decides the prompt: the same seed gives the same
    prompt whatever was drawn before it, another seed another prompt. (The model is built
    first: `build_model` reseeds, which would otherwise decide the prompt on its own.)"""

    def prompt(seed: int, draws_before: int = 0):
        base = build_model("CAUSAL_LM", "gpt2")
        torch.rand(draws_before)  # moves the global generator if the seed were not used
        torch.manual_seed(seed)
        cfg = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init=init)
        return wrap(base, cfg).get_prompt()

    assert torch.equal(prompt(7), prompt(7, draws_before=1000))
    assert not torch.equal(prompt(7), prompt(8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prompt_stays_float32_on_a_half_precision_model(dtype):
    base = build_model("CAUSAL_LM", "llama").to(dtype)
    model = wrap(base, PromptTuningConfig(num_virtual_tokens=4))
    assert model.prompts["default"].embedding.dtype == torch.float32
    ids = torch.randint(4, 30, (2, 5))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype
    out.loss.backward()
    grad = model.prompts["default"].embedding.grad
    assert grad is not None and grad.dtype == torch.float32 and grad.abs().sum() > 0
