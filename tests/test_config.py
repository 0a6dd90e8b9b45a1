"""PromptTuningConfig: the seed's validation rules, made strict, and the JSON contract."""

from __future__ import annotations

import json
import logging

import pytest

from softprompt import PromptTuningConfig, PromptTuningInit, TaskType, wrap
from tests.tiny import build_model


def test_defaults_follow_the_seed():
    cfg = PromptTuningConfig(num_virtual_tokens=8)
    assert cfg.prompt_tuning_init is PromptTuningInit.RANDOM
    assert cfg.peft_type == "PROMPT_TUNING"
    assert cfg.task_type is None and cfg.tokenizer_kwargs is None


@pytest.mark.parametrize("value", ["TEXT", "text", PromptTuningInit.TEXT])
def test_init_accepts_string_values(value):
    cfg = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init=value,
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path="tok",
    )
    assert cfg.prompt_tuning_init is PromptTuningInit.TEXT


def test_unknown_init_string_is_refused_with_the_valid_ones():
    # PEFT silently falls back to RANDOM here.
    with pytest.raises(
        ValueError, match="Unknown prompt_tuning_init 'TEXTT'.*TEXT, CLASS_LABELS, SAMPLE_VOCAB, RANDOM"
    ):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXTT")


def test_unknown_task_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown task_type 'CLM'.*CAUSAL_LM"):
        PromptTuningConfig(num_virtual_tokens=4, task_type="CLM")
    assert PromptTuningConfig(num_virtual_tokens=4, task_type="seq_cls").task_type is TaskType.SEQ_CLS


@pytest.mark.parametrize("n", [None, 0, -3])
def test_num_virtual_tokens_missing_or_not_positive(n):
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        PromptTuningConfig(num_virtual_tokens=n)


@pytest.mark.parametrize("n", ["20", 2.5, True])
def test_num_virtual_tokens_wrong_type(n):
    with pytest.raises(TypeError, match="num_virtual_tokens must be an integer"):
        PromptTuningConfig(num_virtual_tokens=n)


def test_huge_num_virtual_tokens_refused():
    with pytest.raises(ValueError, match="between 1 and 65536"):
        PromptTuningConfig(num_virtual_tokens=10**12)


def test_text_init_needs_tokenizer_and_text():
    with pytest.raises(ValueError, match="needs tokenizer_name_or_path"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="needs prompt_tuning_init_text"):
        PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", tokenizer_name_or_path="tok")


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_init_text_refused(text):
    # PEFT crashes with ZeroDivisionError here.
    with pytest.raises(ValueError, match="empty"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text=text,
            tokenizer_name_or_path="tok",
        )


def test_tokenizer_kwargs_only_with_text_like_inits():
    with pytest.raises(ValueError, match="tokenizer_kwargs only applies"):
        PromptTuningConfig(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True})
    cfg = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hi",
        tokenizer_name_or_path="t",
        tokenizer_kwargs={"use_fast": True},
    )
    assert cfg.tokenizer_kwargs == {"use_fast": True}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trust_remote_code": True},
        {"Trust_Remote_Code": False},
        {"nested": {"trust_remote_code": True}},
        {"x": [{"trust_remote_code": 1}]},
    ],
)
def test_trust_remote_code_anywhere_in_tokenizer_kwargs_refused(kwargs):
    with pytest.raises(ValueError, match="trust_remote_code"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            prompt_tuning_init="TEXT",
            prompt_tuning_init_text="hi",
            tokenizer_name_or_path="t",
            tokenizer_kwargs=kwargs,
        )


def test_class_labels_needs_a_list_that_fits():
    cfg = PromptTuningConfig(
        num_virtual_tokens=4,
        prompt_tuning_init="CLASS_LABELS",
        prompt_tuning_init_text=("positive", "negative"),
        tokenizer_name_or_path="t",
    )
    assert cfg.prompt_tuning_init_text == ["positive", "negative"]
    with pytest.raises(ValueError, match="list of label words"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            prompt_tuning_init="CLASS_LABELS",
            prompt_tuning_init_text="positive",
            tokenizer_name_or_path="t",
        )
    with pytest.raises(ValueError, match="do not fit"):
        PromptTuningConfig(
            num_virtual_tokens=1,
            prompt_tuning_init="CLASS_LABELS",
            prompt_tuning_init_text=["a", "b"],
            tokenizer_name_or_path="t",
        )
    with pytest.raises(ValueError, match="empty or non-string"):
        PromptTuningConfig(
            num_virtual_tokens=4,
            prompt_tuning_init="CLASS_LABELS",
            prompt_tuning_init_text=["a", ""],
            tokenizer_name_or_path="t",
        )


def test_json_round_trip_uses_peft_keys():
    cfg = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=12,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="Classify:",
        tokenizer_name_or_path="tok",
        tokenizer_kwargs={"use_fast": True},
    )
    data = json.loads(cfg.to_json_string())
    assert data["peft_type"] == "PROMPT_TUNING"
    assert data["task_type"] == "CAUSAL_LM" and data["prompt_tuning_init"] == "TEXT"
    assert PromptTuningConfig.from_json_string(cfg.to_json_string()) == cfg


def test_unknown_keys_from_newer_peft_are_kept_with_a_warning(caplog):
    data = PromptTuningConfig(num_virtual_tokens=3).to_dict()
    data.update({"peft_version": "9.9.9", "future_option": {"a": 1}})
    with caplog.at_level(logging.WARNING):
        cfg = PromptTuningConfig.from_dict(data)
    assert "future_option" in caplog.text
    assert cfg.to_dict()["future_option"] == {"a": 1}


def test_other_peft_type_refused():
    with pytest.raises(ValueError, match="LORA"):
        PromptTuningConfig.from_dict({"peft_type": "LORA", "num_virtual_tokens": 3})


def test_wrap_fills_model_values_without_touching_the_callers_config():
    cfg = PromptTuningConfig(num_virtual_tokens=3)
    before = cfg.to_dict()
    model = wrap(build_model("CAUSAL_LM", "llama"), cfg)
    assert cfg.to_dict() == before
    resolved = model.peft_config["default"]
    assert resolved.task_type is TaskType.CAUSAL_LM
    assert (resolved.token_dim, resolved.num_layers, resolved.num_attention_heads) == (32, 2, 4)
    assert resolved.num_transformer_submodules == 1
    seq2seq = wrap(build_model("SEQ_2_SEQ_LM", "t5"), cfg).peft_config["default"]
    assert seq2seq.num_transformer_submodules == 2


def test_wrong_token_dim_names_both_sizes():
    with pytest.raises(ValueError, match="token_dim 64 does not match the model's hidden size 32"):
        wrap(build_model("CAUSAL_LM", "llama"), PromptTuningConfig(num_virtual_tokens=3, token_dim=64))


def test_task_of_the_wrong_kind_of_model():
    with pytest.raises(ValueError, match="SEQ_2_SEQ_LM"):
        wrap(
            build_model("SEQ_2_SEQ_LM", "t5"), PromptTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")
        )
