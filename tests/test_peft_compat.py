"""PEFT 0.21 as an oracle: adapters cross between the libraries and give the same numbers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

peft = pytest.importorskip("peft")

from softprompt import PromptTuningConfig, SoftPromptModel, wrap
from tests.tiny import TASK_ARCHS, VOCAB, build_model

ATOL = 1e-5
N = 5
CASES = [
    ("CAUSAL_LM", "llama"),
    ("CAUSAL_LM", "gpt2"),
    ("SEQ_2_SEQ_LM", "t5"),
    ("SEQ_2_SEQ_LM", "bart"),
    ("SEQ_CLS", "llama"),
    ("SEQ_CLS", "bert"),
]


def _inputs(task: str) -> dict:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, VOCAB, (2, 7), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if task == "SEQ_2_SEQ_LM":
        batch["labels"] = torch.randint(4, VOCAB, (2, 4), generator=g)
    elif task == "CAUSAL_LM":
        batch["labels"] = ids
    else:
        batch["labels"] = torch.tensor([0, 2])
    return batch


def _peft_model(task: str, arch: str):
    base = build_model(task, arch)
    cfg = peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB")
    model = peft.get_peft_model(base, cfg)
    if task == "SEQ_CLS":  # make the saved head differ from the base model's initial head
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "modules_to_save" in name:
                    p.add_(torch.randn_like(p))
    return model.eval()


def _ours_logits(task: str, out) -> torch.Tensor:
    return out.logits


def _peft_logits(task: str, out) -> torch.Tensor:
    # PEFT returns the prompt columns as well for decoder-only causal LMs.
    return out.logits[:, N:] if task == "CAUSAL_LM" else out.logits


@pytest.mark.parametrize("task,arch", CASES)
def test_peft_adapter_loads_with_same_outputs(task, arch, tmp_path):
    pm = _peft_model(task, arch)
    pm.save_pretrained(tmp_path)
    batch = _inputs(task)
    with torch.no_grad():
        expected = pm(**batch)
    ours = SoftPromptModel.from_pretrained(build_model(task, arch), tmp_path).eval()
    with torch.no_grad():
        got = ours(**batch)
    torch.testing.assert_close(_ours_logits(task, got), _peft_logits(task, expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)
    rows = 2 * N if task == "SEQ_2_SEQ_LM" else N
    assert ours.prompts["default"].embedding.shape == (rows, 32)


@pytest.mark.parametrize("task,arch", CASES)
def test_our_adapter_loads_in_peft_with_same_outputs(task, arch, tmp_path):
    ours = wrap(
        build_model(task, arch),
        PromptTuningConfig(task_type=task, num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    if task == "SEQ_CLS":
        with torch.no_grad():
            for p in ours.trainable_parameters():
                p.add_(torch.randn_like(p))
    ours.eval()
    ours.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "PROMPT_TUNING" and saved["task_type"] == task
    batch = _inputs(task)
    with torch.no_grad():
        expected = ours(**batch)
    pm = peft.PeftModel.from_pretrained(build_model(task, arch), tmp_path).eval()
    with torch.no_grad():
        got = pm(**batch)
    torch.testing.assert_close(_peft_logits(task, got), _ours_logits(task, expected), atol=ATOL, rtol=0)
    torch.testing.assert_close(got.loss, expected.loss, atol=ATOL, rtol=0)


def test_peft_causal_lm_with_full_sequence_matches_peft_layout(tmp_path):
    pm = _peft_model("CAUSAL_LM", "llama")
    pm.save_pretrained(tmp_path)
    batch = _inputs("CAUSAL_LM")
    with torch.no_grad():
        expected = pm(**batch).logits
        got = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama"), tmp_path)(
            **batch, full_sequence=True
        ).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_peft_right_padding_bug_is_not_ours(tmp_path):
    """PEFT drops position ids: a right-padded GPT-2 row differs from the row alone in PEFT's
    model... (left padding shows it); ours gives the single-row numbers."""
    pm = _peft_model("CAUSAL_LM", "gpt2")
    pm.save_pretrained(tmp_path)
    ours = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "gpt2"), tmp_path).eval()
    row = torch.randint(4, VOCAB, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), row], dim=1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone = ours(input_ids=row).logits
        ours_padded = ours(input_ids=padded, attention_mask=mask).logits[:, 3:]
        peft_padded = pm(input_ids=padded, attention_mask=mask).logits[:, N + 3 :]
    torch.testing.assert_close(ours_padded, alone, atol=ATOL, rtol=0)
    assert (peft_padded - alone).abs().max() > 1e-3


# Per-token tasks. PEFT puts the prompt in front and returns its columns too (logits,
# start/end logits, hidden states of width N + length); it does not shift TOKEN_CLS labels or
# QA start/end positions by the prompt length (a known PEFT defect), so its loss scores the
# wrong columns and is not compared. What is compared: the files' tensors, bit for bit, and
# the outputs at the user's columns (no padding: PEFT also drops position ids).
PER_TOKEN = [(t, a) for t, a in TASK_ARCHS if t in ("TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")]


def _user_columns(task: str, out, skip: int) -> list[torch.Tensor]:
    if task == "QUESTION_ANS":
        return [out.start_logits[:, skip:], out.end_logits[:, skip:]]
    if task == "FEATURE_EXTRACTION":
        return [out.last_hidden_state[:, skip:]]
    return [out.logits[:, skip:]]


def _plain_inputs() -> dict:
    ids = torch.randint(4, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _assert_same_files(a, b) -> None:
    ta, tb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert ta.keys() == tb.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


@pytest.mark.parametrize("task,arch", PER_TOKEN)
def test_per_token_task_adapters_cross_from_peft(task, arch, tmp_path):
    pm = _peft_model(task, arch)
    with torch.no_grad():  # heads saved with the prompt (TOKEN_CLS, QA) differ from the base's
        for name, p in pm.named_parameters():
            if "modules_to_save" in name:
                p.add_(torch.randn_like(p))
    pm.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert (len(saved) > 1) == (task != "FEATURE_EXTRACTION")
    ours = SoftPromptModel.from_pretrained(build_model(task, arch), tmp_path / "peft").eval()
    assert torch.equal(ours.get_prompt(), saved["prompt_embeddings"])
    ours.save_pretrained(tmp_path / "ours")  # loaded and saved again: the same tensors
    _assert_same_files(tmp_path / "peft", tmp_path / "ours")
    batch = _plain_inputs()
    with torch.no_grad():
        expected, got = pm(**batch), ours(**batch)
    for g, e in zip(_user_columns(task, got, 0), _user_columns(task, expected, N)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task,arch", PER_TOKEN)
def test_per_token_task_adapters_cross_to_peft(task, arch, tmp_path):
    ours = wrap(
        build_model(task, arch),
        PromptTuningConfig(task_type=task, num_virtual_tokens=N, prompt_tuning_init="SAMPLE_VOCAB"),
    )
    with torch.no_grad():
        for p in ours.trainable_parameters():
            p.add_(torch.randn_like(p))
    ours.eval()
    ours.save_pretrained(tmp_path / "ours")
    pm = peft.PeftModel.from_pretrained(build_model(task, arch), tmp_path / "ours").eval()
    assert torch.equal(pm.get_prompt_embedding_to_save("default"), ours.get_prompt())
    pm.save_pretrained(tmp_path / "peft")  # loaded by PEFT and saved again: the same tensors
    _assert_same_files(tmp_path / "ours", tmp_path / "peft")
    batch = _plain_inputs()
    with torch.no_grad():
        expected, got = ours(**batch), pm(**batch)
    for g, e in zip(_user_columns(task, got, N), _user_columns(task, expected, 0)):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
