"""Adapters named on the command line (`name=folder` specs, read by
`softprompt.settings.named_folders`): the settings of the run they came from, and the model
they are loaded onto."""

from __future__ import annotations

from pathlib import Path

from softprompt.base_models import load_model
from softprompt.core.config import PromptTuningConfig
from softprompt.core.model import SoftPromptModel
from softprompt.devices import resolve_device, resolve_dtype
from softprompt.scoring.ensemble import check_same_format
from softprompt.settings import AdapterRun, adapter_run


def first_adapter_run(adapters: list[tuple[str, Path]]) -> AdapterRun:
    """The settings of the run the first adapter with a run_config.json came from."""

    for _, path in adapters:
        found = adapter_run(path)
        if found is not None:
            return found
    return AdapterRun()


def load_with_adapters(
    model_name: str | None,
    adapters: list[tuple[str, Path]],
    device: str | None = None,
    dtype: str | None = None,
    allow_base_mismatch: bool = False,
):

    if device is None:  # the CPU in float32
        base, tokenizer = load_model(model_name)
    else:
        where = resolve_device(device)
        base, tokenizer = load_model(model_name, dtype=resolve_dtype(dtype, where), device=where)
    if adapters:
        first_name, first_path = adapters[0]
        model = SoftPromptModel.from_pretrained(
            base, first_path, adapter_name=first_name, allow_base_mismatch=allow_base_mismatch
        )
        for name, path in adapters[1:]:
            model.load_adapter(path, name, allow_base_mismatch=allow_base_mismatch)
    else:  # the bare model only: a placeholder prompt that is never used
        model = SoftPromptModel(
            base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1), "unused", trainable=False
        )
    return model.eval(), tokenizer


def check_ensemble(adapters: list[tuple[str, Path]]) -> None:

    if len(adapters) < 2:
        raise ValueError("--ensemble needs two or more --adapter (the members).")
    check_same_format(adapters)
