"""The bare model's test scores kept between runs (softprompt.training.score_cache): reused only where
the weights, examples and precision are the same, and equal to scoring again."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.base_models import load_model
from softprompt.core.config import PromptTuningConfig
from softprompt.core.model import SoftPromptModel
from softprompt.scoring.objectives import ClassificationObjective
from softprompt.training import score_cache
from softprompt.training.trainer import TrainConfig, train
from tests.tiny import build_model, make_tokenizer, review_rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-model")
    build_model("CAUSAL_LM", "llama", initializer_range=0.5).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return str(root)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(root))
    return root / "scores"


def _run(tmp_path, model_dir, name, **kw):
    config = {
        "output_dir": str(tmp_path / name),
        "model": model_dir,
        "data": review_rows(32, 1),
        "dev_data": review_rows(8, 2),
        "test_data": review_rows(24, 3),
        "max_steps": 2,
        "batch_size": 8,
        "eval_every": 0,
        "num_virtual_tokens": 3,
        "device": "cpu",
        "bf16": False,
    }
    config.update(kw)
    return train(TrainConfig(**config)).metrics


def _count_bare_scoring(monkeypatch):
    """How many times the bare model (adapter None) is scored on the test set."""
    import softprompt.training.trainer as train_module

    calls = []
    real = train_module.evaluate

    def counting(objective, model, indices=None, adapter=None, **kw):
        if adapter is None:
            calls.append(len(objective))
        return real(objective, model, indices, adapter=adapter, **kw)

    monkeypatch.setattr(train_module, "evaluate", counting)
    return calls


def test_a_second_run_reuses_the_bare_scores_and_they_equal_scoring_again(
    tmp_path, model_dir, cache, monkeypatch
):
    calls = _count_bare_scoring(monkeypatch)
    first = _run(tmp_path, model_dir, "a")
    assert calls == [24] and "zero_shot_reused_from" not in first
    kept = list(cache.glob("*.json"))
    assert len(kept) == 1
    second = _run(tmp_path, model_dir, "b", seed=1, lr=0.1)  # another prompt, the same bare model
    assert calls == [24], "the bare model was scored again"
    assert second["zero_shot_reused_from"] == str(kept[0])
    assert second["zero_shot"] == first["zero_shot"]
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert saved["zero_shot"] == first["zero_shot"] and saved["zero_shot_reused_from"] == str(kept[0])
    fresh = _run(tmp_path, model_dir, "c", reuse_zero_shot=False)
    assert calls == [24, 24] and "zero_shot_reused_from" not in fresh
    assert fresh["zero_shot"] == second["zero_shot"]


def test_other_test_examples_are_scored_again(tmp_path, model_dir, cache, monkeypatch):
    calls = _count_bare_scoring(monkeypatch)
    _run(tmp_path, model_dir, "a")
    _run(tmp_path, model_dir, "b", test_data=review_rows(20, 4))
    _run(tmp_path, model_dir, "c", template="Text: {text}\nSentiment:")
    assert calls == [24, 20, 24] and len(list(cache.glob("*.json"))) == 3


def test_an_unreadable_file_is_scored_again_and_rewritten(tmp_path, model_dir, cache, monkeypatch):
    calls = _count_bare_scoring(monkeypatch)
    first = _run(tmp_path, model_dir, "a")
    (kept,) = cache.glob("*.json")
    kept.write_text("{not json")
    again = _run(tmp_path, model_dir, "b")
    assert calls == [24, 24] and again["zero_shot"] == first["zero_shot"]
    assert json.loads(kept.read_text())["scores"] == first["zero_shot"]


def _model_and_objective(model_dir, rows=None):
    base, tokenizer = load_model(model_dir, dtype=torch.float32, device=torch.device("cpu"))
    model = SoftPromptModel(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    rows = rows or review_rows(10, 5)
    objective = ClassificationObjective.build(
        tokenizer,
        [r["text"] for r in rows],
        [r["label"] for r in rows],
        "Review: {text}\nSentiment:",
        {"negative": " negative", "positive": " positive"},
        64,
    )
    return model, objective


def test_the_key_follows_the_weights_the_examples_and_the_precision(model_dir):
    model, objective = _model_and_objective(model_dir)
    key = score_cache.scores_key(model, objective, bf16=False, batch_size=64)
    assert key == score_cache.scores_key(model, objective, bf16=False, batch_size=64)
    assert key != score_cache.scores_key(model, objective, bf16=True, batch_size=64)
    assert key != score_cache.scores_key(model, objective, bf16=False, batch_size=32)
    _, other = _model_and_objective(model_dir, review_rows(10, 6))
    assert key != score_cache.scores_key(model, other, bf16=False, batch_size=64)
    # one weight deep inside the model (not the embeddings, which the adapter fingerprint samples)
    mlp = model.base_model.model.layers[-1].mlp.down_proj.weight
    with torch.no_grad():
        mlp[0, 0] += 1.0
    assert key != score_cache.scores_key(model, objective, bf16=False, batch_size=64)
    # and the prompt being trained is not part of the bare model
    with torch.no_grad():
        mlp[0, 0] -= 1.0
        for param in model.trainable_parameters():
            param.add_(1.0)
    assert key == score_cache.scores_key(model, objective, bf16=False, batch_size=64)


def test_the_key_follows_softprompts_own_code(model_dir, monkeypatch):
    model, objective = _model_and_objective(model_dir)
    key = score_cache.scores_key(model, objective, bf16=False, batch_size=64)
    assert len(score_cache.source_digest()) == 64
    monkeypatch.setattr(score_cache, "source_digest", lambda: "an edited evaluate.py")
    assert key != score_cache.scores_key(model, objective, bf16=False, batch_size=64)
