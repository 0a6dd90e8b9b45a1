"""What every serving engine shares: the served adapters, and the engine interface.

`AdapterRegistry` maps the names clients use to adapters loaded into one `SoftPromptModel`
(under fresh internal names, so replacing an adapter is atomic), with each adapter's folder
and run settings (template, label words) and the base-model fingerprint check on load. The
built-in engine (`softprompt.serve.engine`) runs that model; the vLLM engine
(`softprompt.serve.vllm_engine`) holds the same kind of model with only its input
embeddings real and sends vLLM `[prompt; token embeddings]` rows. `ServingEngine` is what the
HTTP layer (`softprompt.serve.app`) calls, and all it calls.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from pathlib import Path
from typing import Any, Protocol

from softprompt.core.adapter_files import BaseModelMismatch
from softprompt.core.config import PromptPosition
from softprompt.scoring.classify import run_settings
from softprompt.serve.errors import NotFound, ServeError, Unavailable

logger = logging.getLogger(__name__)

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")


def find_adapter_folder(folder: Path) -> Path | None:
    """The adapter in `folder`: the folder itself, or a run's `best/` (then `last/`) adapter."""
    for candidate in (folder, folder / "best", folder / "last"):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    return None


def scan_adapters(root: Path) -> dict[str, Path]:
    """Every adapter folder directly under `root`, by folder name."""
    found = {}
    if root.is_dir():
        for child in sorted(root.iterdir()):
            if child.is_dir() and ADAPTER_NAME.match(child.name):
                path = find_adapter_folder(child)
                if path is not None:
                    found[child.name] = path
    return found


class AdapterRegistry:
    """The adapters one server serves, by the names clients use (thread-safe lookups).

    Args:
        model: The `SoftPromptModel` adapters are loaded into.
        base_id: The bare model's name (no adapter may take it).
        adapters_dirs: Folders searched for adapters requested by name (just in time).
        allow_base_mismatch: Load adapters saved from a different base model of the same
            width (refused by default, see `softprompt.core.adapter_files.base_fingerprint`).
    """

    def __init__(
        self, model: Any, base_id: str, adapters_dirs: Any = (), allow_base_mismatch: bool = False
    ) -> None:
        self.model = model
        self.base_id = base_id
        self.adapters_dirs = [Path(d) for d in adapters_dirs]
        self.allow_base_mismatch = allow_base_mismatch
        self._served: dict[str, str] = {}  # served name -> the model's internal adapter name
        self._paths: dict[str, Path] = {}
        self._settings: dict[str, dict[str, Any]] = {}
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        #: Held while the model's adapters change, and by an engine that reads prompts on
        #: another thread than the one loading adapters (the vLLM engine).
        self.model_lock = threading.RLock()

    def adapters(self) -> dict[str, Path]:
        """Served adapter names and their folders."""
        with self._lock:
            return dict(self._paths)

    def has(self, name: str) -> bool:
        with self._lock:
            return name in self._served

    def settings_for(self, name: str) -> dict[str, Any]:
        with self._lock:
            return dict(self._settings.get(name, {}))

    def internal_or_none(self, name: str | None) -> str | None:
        """The model's name for served adapter `name`, None for an unknown one."""
        if name is None:
            return None
        with self._lock:
            return self._served.get(name)

    def internal(self, name: str | None) -> str | None:
        """The model's name for served adapter `name` (None: the bare model).

        Raises:
            NotFound: `name` is not served (any more).
        """
        if name is None:
            return None
        internal = self.internal_or_none(name)
        if internal is None:
            raise NotFound(f"the adapter {name!r} is not loaded (it was unloaded).", param="model")
        return internal

    def placed_at_marker(self, name: str | None) -> bool:
        """Whether served adapter `name` goes at a ``{prompt}`` marker inside the input."""

        internal = self.internal_or_none(name)
        config = self.model.peft_config.get(internal) if internal is not None else None
        return config is not None and config.prompt_position == PromptPosition.MARKER

    def prompt_length(self, name: str | None) -> int:
        """Virtual tokens of a served adapter (0 for the bare model or an unknown name)."""
        internal = self.internal_or_none(name)
        prompt = self.model.prompts[internal] if internal in self.model.prompts else None  # noqa: SIM401
        return prompt.num_virtual_tokens if prompt is not None else 0

    def load(self, name: str, path: str | Path) -> None:
        """Load (or replace) adapter `name` from `path`.

        Raises:
            ServeError: A bad name, no adapter in `path`, an adapter for another base model
                (code `base_model_mismatch`) or a file that does not load.
        """

        if not isinstance(name, str) or not ADAPTER_NAME.match(name) or name == self.base_id:
            raise ServeError(
                f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_' or '-', not the "
                "base model's name.",
                param="name",
            )
        folder = find_adapter_folder(Path(path))
        if folder is None:
            raise ServeError(f"no adapter (adapter_config.json) in {str(path)!r}.", param="path")
        try:
            settings = run_settings(folder)
        except ValueError as err:  # a damaged run_config.json: generation works, classify will not
            logger.warning("adapter %s: %s", name, err)
            settings = {}
        internal = f"a{next(self._counter)}"
        try:
            with self.model_lock:
                self.model.load_adapter(folder, internal, allow_base_mismatch=self.allow_base_mismatch)
        except BaseModelMismatch as err:
            self._drop(internal)
            raise ServeError(
                f"cannot load adapter {name!r}: {err}", param="path", code="base_model_mismatch"
            ) from err
        except Exception as err:
            self._drop(internal)
            raise ServeError(
                f"cannot load adapter {name!r} from {str(folder)!r}: {err}", param="path"
            ) from err
        with self.model_lock:
            with self._lock:
                old = self._served.get(name)
                self._served[name] = internal
                self._paths[name] = folder
                self._settings[name] = settings
            if old is not None:
                self.model.delete_adapter(old)
        logger.info("serving adapter %s from %s", name, folder)

    def adopt(self, name: str, internal: str, folder: str | Path = "", settings: Any = None) -> None:
        """Serve an adapter already in the model (`internal`) under `name`."""
        if internal not in self.model.prompts:
            raise ValueError(f"the model has no adapter {internal!r}.")
        with self._lock:
            self._served[name] = internal
            self._paths[name] = Path(folder)
            self._settings[name] = dict(settings or {})

    def _drop(self, internal: str) -> None:
        with self.model_lock:
            if internal in self.model.prompts:
                self.model.delete_adapter(internal)

    def unload(self, name: str) -> None:
        with self.model_lock:
            with self._lock:
                internal = self._served.pop(name, None)
                self._paths.pop(name, None)
                self._settings.pop(name, None)
            if internal is None:
                raise NotFound(f"no adapter named {name!r} is loaded.", param="name")
            self.model.delete_adapter(internal)

    def find_on_disk(self, name: str) -> Path | None:
        """A folder `name` under the adapters folders (just-in-time loading), or None."""
        if not ADAPTER_NAME.match(name):
            return None
        for root in self.adapters_dirs:
            folder = find_adapter_folder(root / name)
            if folder is not None:
                return folder
        return None

    def classification_settings(self, name: str) -> tuple[str, dict[str, str], int | None]:
        """The template, label words and max_length of a served adapter's run.

        Raises:
            ServeError: The adapter's run_config.json gives no template and label words.
        """
        settings = self.settings_for(name)
        template, words = settings.get("template"), settings.get("label_words")
        if not template or not words:
            raise ServeError(
                f"adapter {name!r} has no classification settings: its run_config.json (next to the "
                "adapter or in its parent folder) gives no template and label_words.",
                param="model",
            )
        return template, words, settings.get("max_length")


class AdapterMethods:
    """The adapter half of `ServingEngine`, for an engine with `self.registry`."""

    registry: AdapterRegistry

    def adapters(self) -> dict[str, Path]:
        return self.registry.adapters()

    def has_adapter(self, name: str) -> bool:
        return self.registry.has(name)

    def settings_for(self, name: str) -> dict[str, Any]:
        return self.registry.settings_for(name)

    def prompt_length(self, name: str | None) -> int:
        return self.registry.prompt_length(name)

    def placed_at_marker(self, name: str | None) -> bool:
        return self.registry.placed_at_marker(name)

    def load_adapter_now(self, name: str, path: str | Path) -> None:
        """Load (or replace) adapter `name` from `path` (on the engine's worker, or before start)."""
        self.registry.load(name, path)

    def unload_adapter_now(self, name: str) -> None:
        self.registry.unload(name)

    def find_on_disk(self, name: str) -> Path | None:
        return self.registry.find_on_disk(name)


def stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """The tokens that end a sequence: the generation config's end-of-sequence ids, else the
    tokenizer's."""
    gen = getattr(model.base_model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    return frozenset([eos] if isinstance(eos, int) else (eos or []))


def stop_worker(engine: Any, drain_seconds: float) -> None:
    """An engine's shutdown: the scheduler refuses new work and fails what never started, the
    worker (`engine._thread`, watching `engine._stop`) gets `drain_seconds` to finish what
    runs (`engine._drain_deadline`), then jobs still queued fail."""

    for req in engine.scheduler.close():
        req.fail(Unavailable("the server is shutting down."))
    engine._drain_deadline = time.monotonic() + drain_seconds
    engine._stop.set()
    if engine._thread is not None:
        engine._thread.join(drain_seconds + 10)
    for job in engine.scheduler.pending_jobs():
        job.error = Unavailable("the server is shutting down.")
        job.done.set()
        if job.on_done:
            job.on_done(job)


def context_length(model: Any) -> int:
    """Positions the base model takes (its config's maximum, else 2048)."""
    config = model.base_model.config
    longest = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(longest or 2048)


class ServingEngine(Protocol):
    """What the HTTP layer needs from an engine (`Engine`, `VllmEngine`).

    Generation requests and jobs reach the engine through the `Scheduler` it was built with;
    `classify`, `load_adapter_now` and `unload_adapter_now` run as jobs on its worker.
    """

    context_length: int
    stop_token_ids: frozenset[int]
    description: str

    @property
    def alive(self) -> bool: ...

    def start(self) -> None: ...

    def stop(self, drain_seconds: float = 30.0) -> None: ...

    def adapters(self) -> dict[str, Path]: ...

    def has_adapter(self, name: str) -> bool: ...

    def prompt_length(self, name: str | None) -> int: ...

    def placed_at_marker(self, name: str | None) -> bool: ...

    def load_adapter_now(self, name: str, path: str | Path) -> None: ...

    def unload_adapter_now(self, name: str) -> None: ...

    def find_on_disk(self, name: str) -> Path | None: ...

    def classify(
        self, name: str, texts: list[str], max_length: int | None = None
    ) -> list[dict[str, Any]]: ...

    def observe(self, metrics: Any) -> None:
        """Update the engine's gauges in `metrics` before /metrics is rendered."""
