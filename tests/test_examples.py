"""The examples run as documented."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
