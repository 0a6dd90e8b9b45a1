"""Old module names, kept working for one release (deprecated in 0.2.0, removed in 0.3.0).

The package was a flat list of modules; 0.2.0 put them in folders by layer (`core`, `data`,
`scoring`, `training`, `sharding`, `serve`: see docs/design.md), and 0.1.0 had renamed a
few before that. `import softprompt.model` (or `from softprompt.train import train`) still
gives the module under its new name, the same module object, with a DeprecationWarning
naming the new import; CHANGELOG.md lists every move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

_CORE = ("config", "init", "prompt", "model", "layout", "tasks", "losses", "heads", "prefix", "generation",
         "adapter_files", "attention", "bf16", "introspect", "sharded_tensors", "interpret")  # fmt: skip
_SCORING = ("objectives", "classify", "compose", "ensemble")
_TRAINING = ("runs", "tracking", "plot", "score_cache")

#: old name -> the module's name now
MOVED: dict[str, str] = {
    **{f"softprompt.{m}": f"softprompt.core.{m}" for m in _CORE},
    **{f"softprompt.{m}": f"softprompt.scoring.{m}" for m in _SCORING},
    **{f"softprompt.{m}": f"softprompt.training.{m}" for m in _TRAINING},
    "softprompt.train": "softprompt.training.trainer",
    "softprompt.builtin_data": "softprompt.data.builtin",
    "softprompt.evaluate": "softprompt.scoring.metrics",
    "softprompt.train_checkpoints": "softprompt.training.checkpoints",
    "softprompt.distributed": "softprompt.sharding.distributed",
    "softprompt.zero3": "softprompt.sharding.zero3",
    "softprompt.prompt_embeds": "softprompt.serve.prompt_embeds",
    # renamed in 0.1.0
    "softprompt.models": "softprompt.base_models",
    "softprompt.checkpoint": "softprompt.core.adapter_files",
    "softprompt.datasets": "softprompt.data.builtin",
    "softprompt.inspect": "softprompt.core.interpret",
    "softprompt.trainstate": "softprompt.training.checkpoints",
}


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds an old name and loads it as the module it became."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} is now {new}: import it from there ({spec.name} goes in softprompt 0.3.0).",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        """The module ran when it was imported under its new name. The import system has just
        set the alias's spec on it: it gets its own back (the one its new name was found by)."""
        parent, _, _ = module.__name__.rpartition(".")
        module.__spec__ = importlib.machinery.PathFinder.find_spec(
            module.__name__, sys.modules[parent].__path__
        )


def install() -> None:
    """Let the old names be imported (once per process; `softprompt/__init__` calls it)."""
    if not any(isinstance(finder, _Alias) for finder in sys.meta_path):
        sys.meta_path.append(_Alias())
