"""An adapter knows its base model: the fingerprint saved with it, the refusal to load it onto
a different base of the same width, the override, and files without a fingerprint."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.core.adapter_files import (
    META_BASE,
    WEIGHTS_NAME,
    BaseModelMismatch,
    _safetensors_metadata,
    base_fingerprint,
    load_adapter,
    same_base,
)
from tests.tiny import build_model

ROOT = Path(__file__).resolve().parent.parent


def _save(tmp_path: Path, arch: str = "llama", seed: int = 1, name: str = "a") -> Path:
    base = build_model("CAUSAL_LM", arch, seed=seed)
    torch.manual_seed(5)
    model = SoftPromptModel(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3), name)
    folder = tmp_path / f"{arch}-{seed}-{name}"
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # untied and tied embeddings
def test_same_base_loads_in_any_float_dtype(tmp_path, arch):
    folder = _save(tmp_path, arch)
    saved = json.loads(_safetensors_metadata(folder / WEIGHTS_NAME)[META_BASE])
    assert saved == base_fingerprint(build_model("CAUSAL_LM", arch, seed=1))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        base = build_model("CAUSAL_LM", arch, seed=1).to(dtype)
        assert same_base(saved, base_fingerprint(base)), dtype
        model = SoftPromptModel.from_pretrained(base, folder)
        assert torch.equal(
            model.prompts["default"].embedding.detach().float(),
            SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", arch, seed=1), folder)
            .prompts["default"]
            .embedding.detach()
            .float(),
        )


def test_a_different_base_of_the_same_width_is_refused_naming_both(tmp_path):
    folder = _save(tmp_path, seed=1)
    other = build_model("CAUSAL_LM", "llama", seed=2)
    saved = json.loads(_safetensors_metadata(folder / WEIGHTS_NAME)[META_BASE])
    current = base_fingerprint(other)
    assert saved["config"] == current["config"] and saved["fingerprint"] != current["fingerprint"]
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(BaseModelMismatch) as err:
        SoftPromptModel.from_pretrained(other, folder)
    message = str(err.value)
    assert str(folder) in message
    assert saved["fingerprint"] in message and current["fingerprint"] in message
    assert "allow_base_mismatch=True" in message and "--allow-base-mismatch" in message
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())  # left alone

    model = SoftPromptModel(other, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2), "x")
    with pytest.raises(BaseModelMismatch):
        model.load_adapter(folder, "y")
    with pytest.raises(BaseModelMismatch):
        load_adapter(model, folder, "y")
    assert model.adapter_names == ["x"]


def test_the_override_loads_with_a_warning(tmp_path, caplog):
    folder = _save(tmp_path, seed=1)
    reference = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama", seed=1), folder)
    want = reference.prompts["default"].embedding.detach()
    other = build_model("CAUSAL_LM", "llama", seed=2)
    with caplog.at_level(logging.WARNING, logger="softprompt.core.adapter_files"):
        model = SoftPromptModel.from_pretrained(other, folder, allow_base_mismatch=True)
        model.load_adapter(folder, "b", allow_base_mismatch=True)
        load_adapter(model, folder, "c", allow_base_mismatch=True)
    for name in ("default", "b", "c"):
        assert torch.equal(model.prompts[name].embedding.detach(), want)
    assert sum("loading anyway" in r.getMessage() for r in caplog.records) == 3


def test_a_peft_adapter_without_a_fingerprint_loads_with_a_notice(tmp_path, caplog):
    peft = pytest.importorskip("peft")
    base = build_model("CAUSAL_LM", "llama", seed=1)
    cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    peft.get_peft_model(base, cfg).save_pretrained(tmp_path / "peft")
    assert META_BASE not in _safetensors_metadata(tmp_path / "peft" / WEIGHTS_NAME)
    with caplog.at_level(logging.WARNING, logger="softprompt.core.adapter_files"):
        model = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama", seed=2), tmp_path / "peft")
    notices = [r.getMessage() for r in caplog.records if "no base-model fingerprint" in r.getMessage()]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert model.prompts["default"].num_virtual_tokens == 4


def test_peft_loads_our_fingerprinted_files(tmp_path):
    peft = pytest.importorskip("peft")
    folder = _save(tmp_path)
    ours = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama", seed=1), folder)
    theirs = peft.PeftModel.from_pretrained(build_model("CAUSAL_LM", "llama", seed=1), str(folder))
    got = theirs.prompt_encoder["default"].embedding.weight.detach()
    assert torch.equal(got, ours.prompts["default"].embedding.detach())


def test_fingerprint_is_stable_across_saves_loads_and_processes(tmp_path):
    folder = _save(tmp_path, name="a")
    again = _save(tmp_path / "again", name="a")
    assert (folder / WEIGHTS_NAME).read_bytes() == (again / WEIGHTS_NAME).read_bytes()
    # Loaded and saved again: the same file, byte for byte.
    model = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama", seed=1), folder)
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / WEIGHTS_NAME).read_bytes() == (folder / WEIGHTS_NAME).read_bytes()
    # Another process computes the same fingerprint and writes the same bytes.
    script = (
        "import json, sys, torch\n"
        "from softprompt import PromptTuningConfig, SoftPromptModel\n"
        "from softprompt.core.adapter_files import base_fingerprint\n"
        "from tests.tiny import build_model\n"
        "base = build_model('CAUSAL_LM', 'llama', seed=1)\n"
        "torch.manual_seed(5)\n"
        "m = SoftPromptModel(base, PromptTuningConfig(task_type='CAUSAL_LM', num_virtual_tokens=3), 'a')\n"
        "m.save_pretrained(sys.argv[1])\n"
        "print(json.dumps(base_fingerprint(base)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "other")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == base_fingerprint(
        build_model("CAUSAL_LM", "llama", seed=1)
    )
    assert (tmp_path / "other" / WEIGHTS_NAME).read_bytes() == (folder / WEIGHTS_NAME).read_bytes()


def test_fingerprint_is_cached_per_model_and_follows_weight_changes():
    from softprompt.core import adapter_files

    base = build_model("CAUSAL_LM", "llama", seed=1)
    first = base_fingerprint(base)
    stamp, _ = adapter_files._FINGERPRINTS[base]
    adapter_files._FINGERPRINTS[base] = (stamp, {**first, "fingerprint": "from-the-cache"})
    assert base_fingerprint(base)["fingerprint"] == "from-the-cache"  # not computed again
    with torch.no_grad():
        base.get_input_embeddings().weight.mul_(-1.0)  # bumps the version counter: computed again
    changed = base_fingerprint(base)
    assert changed["fingerprint"] not in ("from-the-cache", first["fingerprint"])
    assert not same_base(first, changed)


def test_no_fingerprint_for_a_model_on_the_meta_device():
    with torch.device("meta"):
        base = build_model("CAUSAL_LM", "llama", seed=1)
    assert base_fingerprint(base) is None


def test_cli_refuses_another_base_unless_allow_base_mismatch(tmp_path, capsys):
    from softprompt.cli import EXIT_ERROR, main
    from tests.tiny import save_model

    folder = _save(tmp_path, seed=1)
    model_dir = tmp_path / "other-model"
    save_model(model_dir, seed=2)
    assert main(["inspect", str(folder), "--model", str(model_dir), "--json"]) == EXIT_ERROR
    assert "--allow-base-mismatch" in capsys.readouterr().err
    assert main(["inspect", str(folder), "--model", str(model_dir), "--json", "--allow-base-mismatch"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter"] == str(folder)
