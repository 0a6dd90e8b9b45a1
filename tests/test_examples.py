"""The examples run as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quickstart_trains_saves_loads_and_generates(tmp_path):
    out = _load("quickstart").main(str(tmp_path))
    assert out[0].tolist() == [5, 6, 7, 8, 9, 10, 11]
    assert (tmp_path / "adapter_model.safetensors").exists()


def test_hugging_face_trainer_trains_only_the_prompt(tmp_path):
    module = _load("hf_trainer")
    result = module.main(str(tmp_path))
    assert result["last_loss"] < 0.75 * result["first_loss"]
    assert (tmp_path / "prompt" / "adapter_model.safetensors").exists()
    trained_base = result["model"].base_model.state_dict()
    fresh = module.tiny_model().state_dict()
    assert all(torch.equal(trained_base[k], v) for k, v in fresh.items()), (
        "the Trainer must not touch the base model"
    )
