"""Adapter files: bit-exact round trips, atomic writes, clear errors for damaged files."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from softprompt import AdapterFileError, PromptTuningConfig, SoftPromptModel, wrap
from softprompt.core.adapter_files import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from tests.tiny import build_model


def _saved(tmp_path, task="SEQ_CLS", arch="llama", n=4):
    model = wrap(build_model(task, arch), PromptTuningConfig(num_virtual_tokens=n))
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn_like(p))
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    return model, folder


def test_round_trip_is_bit_exact(tmp_path):
    model, folder = _saved(tmp_path)
    assert sorted(os.listdir(folder)) == [CONFIG_NAME, WEIGHTS_NAME]
    tensors = load_file(folder / WEIGHTS_NAME)
    assert set(tensors) == {"prompt_embeddings", "base_model.score.weight"}
    loaded = SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), folder)
    assert torch.equal(loaded.get_prompt(), model.get_prompt())
    assert torch.equal(
        loaded.head_modules("default")["score"].weight, model.head_modules("default")["score"].weight
    )
    again = tmp_path / "again"
    loaded.save_pretrained(again)
    assert (again / WEIGHTS_NAME).read_bytes() == (folder / WEIGHTS_NAME).read_bytes()
    assert json.loads((again / CONFIG_NAME).read_text()) == json.loads((folder / CONFIG_NAME).read_text())


def test_multiple_adapters_save_like_peft(tmp_path):
    model = wrap(build_model("CAUSAL_LM", "gpt2"), PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("other", PromptTuningConfig(num_virtual_tokens=5))
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / WEIGHTS_NAME).exists() and (tmp_path / "out" / "other" / WEIGHTS_NAME).exists()
    model.load_adapter(tmp_path / "out" / "other", "copy")
    assert torch.equal(model.get_prompt("copy"), model.get_prompt("other"))


def test_save_refuses_to_overwrite_a_different_adapter(tmp_path):
    model, folder = _saved(tmp_path)
    original = (folder / WEIGHTS_NAME).read_bytes()
    model.save_pretrained(folder)  # the same adapter again: fine
    with torch.no_grad():
        model.prompts["default"].embedding.add_(1.0)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        model.save_pretrained(folder)
    assert (folder / WEIGHTS_NAME).read_bytes() == original
    model.save_pretrained(folder, overwrite=True)
    assert torch.equal(
        SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), folder).get_prompt(),
        model.get_prompt(),
    )
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]


def test_interrupted_save_between_the_two_renames_loads_the_new_adapter(tmp_path, caplog):
    _old, folder = _saved(tmp_path)
    new = wrap(build_model("SEQ_CLS", "llama"), PromptTuningConfig(num_virtual_tokens=6))
    stale_config = (folder / CONFIG_NAME).read_text()
    new.save_pretrained(folder, overwrite=True)
    (folder / CONFIG_NAME).write_text(stale_config)  # as if the process died before the config rename
    loaded = SoftPromptModel.from_pretrained(build_model("SEQ_CLS", "llama"), folder)
    assert torch.equal(loaded.get_prompt(), new.get_prompt())
    assert "interrupted save" in caplog.text


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        read_adapter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterFileError, match="has no adapter_model.safetensors"):
        read_adapter(tmp_path / "empty")


@pytest.mark.parametrize("cut", [0, 7, 100, -5])
def test_truncated_or_empty_weights(tmp_path, cut):
    _, folder = _saved(tmp_path)
    data = (folder / WEIGHTS_NAME).read_bytes()
    (folder / WEIGHTS_NAME).write_bytes(data[:cut])
    with pytest.raises(AdapterFileError, match=WEIGHTS_NAME):
        read_adapter(folder)


def test_bit_flip_is_detected(tmp_path):
    _, folder = _saved(tmp_path)
    data = bytearray((folder / WEIGHTS_NAME).read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's data
    (folder / WEIGHTS_NAME).write_bytes(bytes(data))
    with pytest.raises(AdapterFileError, match="corrupted"):
        read_adapter(folder)


def _rewrite(folder, tensors):
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def test_wrong_shape_names_file_and_both_shapes(tmp_path):
    _, folder = _saved(tmp_path)
    _rewrite(folder, {"prompt_embeddings": torch.zeros(3, 32), "base_model.score.weight": torch.zeros(3, 32)})
    with pytest.raises(AdapterFileError, match=r"has shape \(3, 32\).*describes \(4, 32\)"):
        read_adapter(folder)


def test_wrong_dtype_and_non_finite(tmp_path):
    _, folder = _saved(tmp_path)
    _rewrite(folder, {"prompt_embeddings": torch.zeros(4, 32, dtype=torch.int64)})
    with pytest.raises(AdapterFileError, match="dtype torch.int64"):
        read_adapter(folder)
    _rewrite(folder, {"prompt_embeddings": torch.full((4, 32), float("nan"))})
    with pytest.raises(AdapterFileError, match="NaN"):
        read_adapter(folder)


def test_half_precision_file_is_accepted(tmp_path):
    _, folder = _saved(tmp_path)
    _rewrite(folder, {"prompt_embeddings": torch.ones(4, 32, dtype=torch.bfloat16)})
    _config, tensors = read_adapter(folder)
    assert tensors["prompt_embeddings"].dtype == torch.float32


def test_extra_keys_refused(tmp_path):
    _, folder = _saved(tmp_path)
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["base_model.model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    _rewrite(folder, tensors)
    with pytest.raises(AdapterFileError, match="unexpected tensors"):
        read_adapter(folder)


def test_other_hidden_size_names_both_shapes_and_leaves_the_model_alone(tmp_path):
    _, folder = _saved(tmp_path, task="CAUSAL_LM")
    big = build_model("CAUSAL_LM", "llama", hidden_size=64, intermediate_size=64)
    with pytest.raises(AdapterFileError, match=r"shape \(4, 32\).*needs \(4, 64\)"):
        SoftPromptModel.from_pretrained(big, folder)
    assert all(p.requires_grad for p in big.parameters()), "the base model must not be touched"
    model = wrap(
        build_model("CAUSAL_LM", "llama", hidden_size=64, intermediate_size=64),
        PromptTuningConfig(num_virtual_tokens=2),
    )
    with pytest.raises(AdapterFileError, match="different model"):
        model.load_adapter(folder, "x")
    assert model.adapter_names == ["default"]


def test_head_of_other_size_refused_before_anything_is_attached(tmp_path):
    _, folder = _saved(tmp_path)
    other = build_model("SEQ_CLS", "llama", num_labels=5)
    with pytest.raises(AdapterFileError, match="different number of labels"):
        SoftPromptModel.from_pretrained(other, folder)
    assert type(other.score).__name__ == "Linear"


def test_legacy_bin_is_read_with_weights_only(tmp_path):
    model, folder = _saved(tmp_path, task="CAUSAL_LM")
    tensors = load_file(folder / WEIGHTS_NAME)
    os.remove(folder / WEIGHTS_NAME)
    torch.save(tensors, folder / "adapter_model.bin")
    loaded = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama"), folder)
    assert torch.equal(loaded.get_prompt(), model.get_prompt())


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/softprompt-pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    _, folder = _saved(tmp_path, task="CAUSAL_LM")
    os.remove(folder / WEIGHTS_NAME)
    marker = "/tmp/softprompt-pwned"
    if os.path.exists(marker):
        os.remove(marker)
    with open(folder / "adapter_model.bin", "wb") as fh:
        pickle.dump({"prompt_embeddings": _Exploit()}, fh)
    with pytest.raises(AdapterFileError, match="weights_only"):
        read_adapter(folder)
    assert not os.path.exists(marker)


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"num_virtual_tokens": "4"}, "must be an integer"),
        ({"num_virtual_tokens": 10**9}, "between 1 and"),
        ({"peft_type": "LORA"}, "LORA"),
        ({"task_type": "DANCE"}, "Unknown task_type"),
        ({"base_model_name_or_path": "../../etc/models"}, "contains '..'"),
        ({"tokenizer_name_or_path": "a/../../b"}, "contains '..'"),
        ({"modules_to_save": ["../score"]}, "not a module name"),
        ({"num_virtual_tokens": 2.5}, "must be an integer"),
        ({"token_dim": -4}, "between 1 and"),
        (
            {
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "x",
                "tokenizer_name_or_path": "t",
                "tokenizer_kwargs": {"trust_remote_code": True},
            },
            "trust_remote_code",
        ),
    ],
)
def test_hostile_config_values(tmp_path, patch, match):
    _, folder = _saved(tmp_path, task="CAUSAL_LM")
    data = json.loads((folder / CONFIG_NAME).read_text())
    data.update(patch)
    (folder / CONFIG_NAME).write_text(json.dumps(data))
    # the weights' own copy of the config would win: drop it to test the JSON file alone
    _rewrite(folder, load_file(folder / WEIGHTS_NAME))
    with pytest.raises(AdapterFileError, match=match):
        read_adapter(folder)


def test_config_that_is_not_json(tmp_path):
    _, folder = _saved(tmp_path, task="CAUSAL_LM")
    _rewrite(folder, load_file(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        read_adapter(folder)
