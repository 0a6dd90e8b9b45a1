"""softprompt.training.train from Python: in-memory data, options, schedules, early stopping."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.data import Example
from softprompt.training.trainer import TrainConfig, TrainingError, _lr_lambda, train
from tests.tiny import build_model, make_tokenizer, review_rows


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    build_model("CAUSAL_LM", "llama", initializer_range=0.5).save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return str(root)


def _config(tmp_path, model_dir, **kw):
    base = {
        "output_dir": str(tmp_path / "run"),
        "model": model_dir,
        "data": review_rows(48, 1),
        "dev_data": review_rows(12, 2),
        "max_steps": 4,
        "batch_size": 8,
        "eval_every": 2,
        "eval_samples": None,
        "num_virtual_tokens": 3,
        "zero_shot": False,
    }
    base.update(kw)
    return TrainConfig(**base)


def test_records_and_examples_as_data(tmp_path, model_dir):
    result = train(_config(tmp_path, model_dir))
    assert result.steps == 4 and result.metrics["final_split"] == "dev"
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["config"]["data"] == "<list of 48 records>"
    assert saved["resolved"]["label_words"] == {"negative": " negative", "positive": " positive"}
    examples = [Example(r["text"], label=r["label"]) for r in review_rows(24, 3)]
    result = train(
        _config(
            tmp_path, model_dir, output_dir=str(tmp_path / "ex"), data=examples, dev_data=None, max_steps=2
        )
    )
    assert result.steps == 2


def test_generation_data(tmp_path, model_dir):
    rows = [{"text": f"{w} movie", "target": w} for w in ["good", "bad", "fun", "boring"] * 6]
    result = train(
        _config(
            tmp_path, model_dir, data=rows, dev_data=rows[:4], max_steps=3, eval_every=3, max_new_tokens=2
        )
    )
    assert set(result.metrics["tuned"]) >= {"exact_match", "f1"}


def test_early_stopping(tmp_path, model_dir):
    result = train(
        _config(
            tmp_path,
            model_dir,
            lr=1e-9,
            max_steps=40,
            eval_every=1,
            early_stopping_patience=2,
            checkpoint_every=100,
        )
    )
    assert result.steps == 3 and result.metrics["stop_reason"].startswith("early stopping")


def test_gradient_accumulation_equals_one_big_batch(model_dir):
    """What the loop does with grad_accum: each micro-batch loss / number of micro-batches."""
    from softprompt import PromptTuningConfig, wrap
    from softprompt.scoring.objectives import ClassificationObjective

    tokenizer = make_tokenizer()
    rows = review_rows(8, 4)
    objective = ClassificationObjective.build(
        tokenizer,
        [r["text"] for r in rows],
        [r["label"] for r in rows],
        "{text}",
        {"negative": " negative", "positive": " positive"},
        64,
    )
    model = wrap(
        build_model("CAUSAL_LM", "llama", initializer_range=0.5), PromptTuningConfig(num_virtual_tokens=3)
    )
    objective.loss(model, list(range(8))).backward()
    whole = model.prompts["default"].embedding.grad.clone()
    model.prompts["default"].embedding.grad = None
    for half in (range(4), range(4, 8)):
        (objective.loss(model, list(half)) / 2).backward()
    torch.testing.assert_close(model.prompts["default"].embedding.grad, whole, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_optimizers(tmp_path, model_dir, optimizer):
    result = train(_config(tmp_path, model_dir, optimizer=optimizer, max_steps=2, eval_every=0))
    assert result.steps == 2


def test_schedules():
    for schedule, last in (("linear", 0.0), ("cosine", 0.0), ("constant", 1.0)):
        f = _lr_lambda(TrainConfig(output_dir="x", warmup_steps=4, schedule=schedule, max_steps=20), 20)
        assert f(0) == pytest.approx(1 / 5) and f(3) == pytest.approx(4 / 5)
        assert f(4) == pytest.approx(1.0) and f(20) == pytest.approx(last, abs=1e-9)


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": -1},
        {"batch_size": 0},
        {"optimizer": "sgd"},
        {"schedule": "step"},
        {"init": "FANCY"},
        {"output_dir": ""},
    ],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(ValueError):
        TrainConfig(**{"output_dir": "x", **bad})


def test_resume_with_different_settings_is_refused(tmp_path, model_dir):
    train(_config(tmp_path, model_dir, max_steps=2, eval_every=0))
    with pytest.raises(TrainingError, match="num_virtual_tokens"):
        train(_config(tmp_path, model_dir, max_steps=2, eval_every=0, num_virtual_tokens=5, resume=True))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_eager_attention_gives_the_same_loss_and_gradient_as_sdpa(arch):
    """bf16 training on CPU switches to eager attention; it must compute the same thing."""
    from softprompt import PromptTuningConfig, wrap
    from softprompt.core.attention import attention_implementation
    from softprompt.scoring.objectives import ClassificationObjective

    tokenizer = make_tokenizer()
    rows = review_rows(8, 5)
    texts = [" ".join([r["text"]] * (1 + i % 3)) for i, r in enumerate(rows)]  # 3 lengths: padded batch
    objective = ClassificationObjective.build(
        tokenizer,
        texts,
        [r["label"] for r in rows],
        "{text}",
        {"negative": " negative", "positive": " positive"},
        64,
    )
    assert len(set(objective.lengths)) == 3
    model = wrap(
        build_model("CAUSAL_LM", arch, initializer_range=0.5, attn_implementation="sdpa"),
        PromptTuningConfig(num_virtual_tokens=4),
    )
    results = {}
    for name in ("sdpa", "eager"):
        with attention_implementation(model.base_model, name):
            assert model.base_model.config._attn_implementation == name
            loss = objective.loss(model, list(range(8)))
            loss.backward()
        results[name] = (loss.detach(), model.prompts["default"].embedding.grad.clone())
        model.prompts["default"].embedding.grad = None
    assert model.base_model.config._attn_implementation == "sdpa"  # restored
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-5, rtol=1e-4)


def test_attention_switch_is_undone_on_error_and_chosen_for_bf16_cpu_only():
    from softprompt.core.attention import attention_implementation, training_attention

    base = build_model("CAUSAL_LM", "llama", attn_implementation="sdpa")
    with pytest.raises(RuntimeError, match="boom"), attention_implementation(base, "eager"):
        raise RuntimeError("boom")
    assert base.config._attn_implementation == "sdpa"
    assert training_attention(base, True, torch.device("cpu"), 64) == "eager"
    assert training_attention(base, False, torch.device("cpu"), 64) is None
    assert training_attention(base, True, torch.device("cuda"), 64) is None


def test_bf16_default_follows_the_hardware(tmp_path, model_dir):
    from softprompt.core.bf16 import native_bf16

    result = train(_config(tmp_path, model_dir, max_steps=2, eval_every=0))
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())
    assert saved["config"]["bf16"] is None
    assert saved["resolved"]["bf16"] is native_bf16(torch.device("cpu"))
    assert result.steps == 2
    train(
        _config(tmp_path, model_dir, output_dir=str(tmp_path / "off"), max_steps=2, eval_every=0, bf16=False)
    )
    assert json.loads((tmp_path / "off" / "run_config.json").read_text())["resolved"]["bf16"] is False


def test_best_holds_the_prompt_of_the_best_dev_evaluation(tmp_path, model_dir):
    """`best/` is the prompt of the first evaluation with the highest dev metric (ties keep the
    earlier one), as saved at that step, whatever came after."""
    from safetensors.torch import load_file

    result = train(
        _config(
            tmp_path, model_dir, max_steps=12, eval_every=2, checkpoint_every=2, keep_checkpoints=100, lr=0.05
        )
    )
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["dev_accuracy"]) for r in records if r.get("event") == "eval"]
    assert [s for s, _ in evals] == [2, 4, 6, 8, 10, 12]
    top = max(v for _, v in evals)
    best_step = next(s for s, v in evals if v == top)
    assert result.best_step == best_step

    def prompt(folder):
        return load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]

    best = prompt(run / "best")
    assert torch.equal(best, prompt(run / "checkpoints" / f"step-{best_step:08d}"))
    for step, _ in evals:
        if step != best_step:  # the checkpoints differ, so the comparison above picks one step
            assert not torch.equal(best, prompt(run / "checkpoints" / f"step-{step:08d}")), step


@pytest.mark.parametrize("float32_cpu", [True, False], ids=["float32-cpu", "bf16"])
def test_the_recipe_follows_the_hardware_unless_the_schedule_is_yours(monkeypatch, float32_cpu):
    """auto: the short recipe where the frozen model trains in float32 on a CPU (simulated
    both ways, so the test is the same on every machine), the full one elsewhere or when
    the user set a field the short recipe sets; an explicit recipe fills only the fields
    left at their defaults; the line says which and why."""
    from softprompt.settings import RECIPES
    from softprompt.training import runs

    monkeypatch.setattr(runs, "resolve_bf16", lambda setting, device: not float32_cpu)
    short, full = RECIPES["short"], {k: getattr(TrainConfig(output_dir="x"), k) for k in RECIPES["short"]}
    assert short and short != full
    config, line = runs.resolve_recipe(TrainConfig(output_dir="x"))
    want = short if float32_cpu else full
    assert {k: getattr(config, k) for k in short} == want
    assert config.recipe == ("short" if float32_cpu else "full")
    assert line.startswith(f"recipe: {config.recipe}, because ")
    assert ("without AMX or AVX512-BF16" in line) is float32_cpu
    mine, line = runs.resolve_recipe(TrainConfig(output_dir="x", max_steps=7))  # my schedule
    assert (mine.recipe, mine.max_steps, mine.batch_size, mine.eval_every) == ("full", 7, 32, 100)
    assert ("because you set max_steps" in line) is float32_cpu
    forced, _ = runs.resolve_recipe(TrainConfig(output_dir="x", recipe="short", max_steps=7))
    assert (forced.max_steps, forced.batch_size, forced.eval_every) == (7, short["batch_size"], 0)
    kept, _ = runs.resolve_recipe(TrainConfig(output_dir="x", recipe="full"))
    assert {k: getattr(kept, k) for k in short} == full
    with pytest.raises(ValueError, match="recipe must be auto, full or short; got 'fast'"):
        TrainConfig(output_dir="x", recipe="fast")


def test_a_run_records_and_prints_the_recipe_it_used(tmp_path, model_dir):
    """run_config.json holds the values the run used and the recipe's name (batch_size left
    at its default: the recipe's; max_steps and eval_every set: kept); the progress callback
    gets the recipe's line first; resuming the run resolves to the same values."""
    events = []
    config = _config(tmp_path, model_dir, recipe="short", max_steps=2, batch_size=32)
    result = train(config, callback=lambda event, info: events.append((event, info)))
    saved = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    used = (saved["recipe"], saved["max_steps"], saved["batch_size"], saved["eval_every"])
    assert used == ("short", 2, 16, 2)
    assert result.steps == 2
    phases = [info["message"] for event, info in events if event == "phase"]
    assert phases[0] == (
        "recipe: short, as asked: 2 steps of 16 at lr 0.08, 512 dev examples scored every 2 steps"
    )
    again = _config(tmp_path, model_dir, recipe="short", max_steps=2, batch_size=32, resume=True)
    assert train(again).steps == 2  # the same resolved settings: accepted
    other = _config(tmp_path, model_dir, recipe="full", max_steps=2, batch_size=32, resume=True)
    with pytest.raises(TrainingError, match="batch_size: 16 -> 32"):
        train(other)
