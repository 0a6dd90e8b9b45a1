"""softprompt: prompt tuning for frozen Hugging Face transformers models.

>>> from softprompt import PromptTuningConfig, wrap
>>> model = wrap(base_model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20))

Importing this package has one side effect: the module names of softprompt 0.1 (the flat
`softprompt.model`, `softprompt.train`, ...) stay importable for one more release, with a
DeprecationWarning naming the new place (`softprompt._moved`).
"""

from __future__ import annotations

from typing import Any

from softprompt import _moved
from softprompt.core.adapter_files import AdapterFileError
from softprompt.core.config import PromptTuningConfig, PromptTuningInit, TaskType
from softprompt.core.model import BASE, SoftPromptModel

__version__ = "0.2.0"

_moved.install()


def wrap(
    base_model: Any,
    config: PromptTuningConfig,
    adapter_name: str = "default",
    *,
    tokenizer: Any | None = None,
) -> SoftPromptModel:
    """Freeze `base_model` and attach a new trainable soft prompt described by `config`.

    Args:
        base_model: A transformers model.
        config: The prompt's configuration (left unchanged; model-derived values go into
            `model.peft_config[adapter_name]`).
        adapter_name: Name of this first prompt.
        tokenizer: Optional tokenizer for TEXT / CLASS_LABELS initialisation.

    Returns:
        A `SoftPromptModel` whose only trainable parameters are the prompt (and a new
        task head for classification / QA, see `PromptTuningConfig.modules_to_save`).
    """
    return SoftPromptModel(base_model, config, adapter_name, tokenizer=tokenizer)


__all__ = [
    "BASE",
    "AdapterFileError",
    "PromptTuningConfig",
    "PromptTuningInit",
    "SoftPromptModel",
    "TaskType",
    "__version__",
    "wrap",
]
