"""The server's state and settings: `ServeConfig` (the `softprompt serve` options) and
`Server` (the engine once loaded, the scheduler, metrics), with the engine it builds."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.base_models import DEFAULT_MODEL, load_model
from softprompt.core.config import PromptTuningConfig
from softprompt.core.model import SoftPromptModel
from softprompt.devices import resolve_device, resolve_dtype
from softprompt.serve.adapters import scan_adapters
from softprompt.serve.engine import PLACEHOLDER, Engine
from softprompt.serve.errors import ServeError, Unavailable
from softprompt.serve.metrics import Metrics
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.vllm_engine import VllmEngine, embeddings_only_model
from softprompt.settings import BaseModelConfig, BatchingConfig, HttpConfig, ServedAdapters, option

logger = logging.getLogger(__name__)

ENGINES = ("builtin", "vllm")


@dataclass
class ServeConfig(HttpConfig, BatchingConfig, ServedAdapters, BaseModelConfig):
    """How the server runs: every field is a `softprompt serve` option, from the settings
    groups (`softprompt.settings`): `BaseModelConfig` (model, device, dtype, as for `train`),
    `ServedAdapters` (adapters, adapters_dirs, adapter_roots, allow_adapter_updates,
    allow_base_mismatch), `BatchingConfig` (max_batch_size, max_queue, prompt_cache_mb,
    packed, prefill_tokens), `HttpConfig` (base_id, api_key, max_body_bytes, drain_seconds),
    and the engine.

    Attributes:
        model: Base model id or folder (None: the packaged default model).
        base_id: The name clients use for the bare model (default: `model`, or the
            default model's name).
        adapters: Adapters served from the start, name -> folder.
        adapters_dirs: Folders whose sub-folders are adapters (by folder name), loaded
            at start and, when added later, on their first request.
        adapter_roots: Further folders `/v1/load_adapter` may load from.
        allow_adapter_updates: Enable `/v1/load_adapter` and `/v1/unload_adapter`.
        allow_base_mismatch: Serve adapters saved from a different base model of the same
            width (refused by default: 400 `base_model_mismatch` at load time).
        max_batch_size: Sequences decoded together at most.
        max_queue: Requests waiting at most (more get 429).
        prompt_cache_mb: Memory budget of the prompts' KV (None: unbounded).
        packed: Packed steps (`softprompt.serve.batching`); None: where the model passes the
            engine's start-up check; False: padded batches.
        prefill_tokens: Prompt tokens prefilled per step at most (packed steps).
        api_key: Require `Authorization: Bearer <key>` on /v1 routes.
        max_body_bytes: Larger request bodies get 413.
        drain_seconds: At shutdown, how long running requests may take to finish.
        device: Where the model runs: auto (the first GPU if there is one, else the CPU),
            cpu, cuda, cuda:N or mps, as for `softprompt train`.
        dtype: The weights' dtype: auto (bfloat16 on a GPU that has it, float16 on one that
            does not, float32 on the CPU), float32, bfloat16 or float16.
        engine: "builtin" (this process runs the model) or "vllm" (a vLLM server does, see
            `softprompt.serve.vllm_engine`; this process keeps the tokenizer and embeddings).
        vllm: Where vLLM is, a `softprompt.serve.vllm_engine.VllmSettings` (engine "vllm").
    """

    engine: str = option(
        "builtin",
        "builtin: this process runs the model. vllm: a vLLM server started with --enable-prompt-embeds "
        "does; this process keeps the tokenizer and the embeddings and sends vLLM [prompt; text] embeddings.",
        choices=ENGINES,
    )
    vllm: Any = option(None, "Where vLLM is (a VllmSettings).", cli=False)

    def __post_init__(self) -> None:
        self._validate_model()
        self._validate_batching()
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be builtin or vllm; got {self.engine!r}.")
        if self.engine == "vllm" and self.vllm is None:
            raise ValueError("engine='vllm' needs vllm=VllmSettings(url=...): where vLLM serves the model.")

    def resolved_base_id(self) -> str:
        if self.base_id:
            return self.base_id
        if self.model:
            return self.model
        return DEFAULT_MODEL


class Server:
    """What the routes share: the engine once loaded, the scheduler, metrics, state."""

    def __init__(self, config: ServeConfig, loader: Callable[[], tuple[Any, Any]] | None) -> None:

        self.config = config
        self.base_id = config.resolved_base_id()
        self.loader = loader
        self.metrics = Metrics()
        self.scheduler = Scheduler(max_batch_size=config.max_batch_size, max_queue=config.max_queue)
        self.engine: Any = None
        self.tokenizer: Any = None
        self.state = "loading"
        self.error: str | None = None
        self.created = int(time.time())
        self.roots = [Path(p).resolve() for p in (*config.adapters_dirs, *config.adapter_roots)]

    def load(self) -> None:
        """Load the model and the start-up adapters, then start the engine (own thread)."""
        try:
            model, tokenizer = (self.loader or default_loader(self.config))()
            engine = build_engine(self, model, tokenizer)
            for root in self.config.adapters_dirs:
                for name, path in scan_adapters(Path(root)).items():
                    try:
                        engine.load_adapter_now(name, path)
                    except ServeError as err:  # one broken folder does not stop the others
                        logger.error("not serving %s: %s", name, err.message)
            for name, path in self.config.adapters.items():
                engine.load_adapter_now(name, path)
            engine.start()
            self.tokenizer, self.engine, self.state = tokenizer, engine, "ready"
            logger.info(
                "ready: %s with %d adapters, on %s", self.base_id, len(engine.adapters()), engine.description
            )
        except Exception as err:
            logger.exception("loading failed")
            self.error = f"{type(err).__name__}: {err}"
            self.state = "failed"

    def ready_engine(self) -> Any:
        if self.state == "ready" and self.engine is not None and self.engine.alive:
            return self.engine
        if self.state == "loading":
            raise Unavailable("the model is still loading; retry shortly.")
        raise Unavailable(f"the model worker is not running ({self.error or self.state}).")


def build_engine(server: Server, model: Any, tokenizer: Any) -> Any:
    """The configured engine over `model` (see `ServeConfig.engine`)."""
    config = server.config
    common = {
        "base_id": server.base_id,
        "metrics": server.metrics,
        "adapters_dirs": [Path(d) for d in config.adapters_dirs],
        "allow_base_mismatch": config.allow_base_mismatch,
    }
    if config.engine == "vllm":
        return VllmEngine(model, tokenizer, server.scheduler, settings=config.vllm, **common)

    return Engine(
        model,
        tokenizer,
        server.scheduler,
        prompt_cache_mb=config.prompt_cache_mb,
        packed=config.packed,
        prefill_tokens=config.prefill_tokens,
        **common,
    )


def default_loader(config: ServeConfig) -> Callable[[], tuple[Any, Any]]:
    def load() -> tuple[Any, Any]:

        if config.engine == "vllm":  # the front: the tokenizer and the input embeddings only
            dtype = resolve_dtype("float32" if config.dtype == "auto" else config.dtype, torch_cpu())
            base, tokenizer = embeddings_only_model(config.model, dtype)
        else:
            device = resolve_device(config.device)
            base, tokenizer = load_model(
                config.model, dtype=resolve_dtype(config.dtype, device), device=device
            )
        model = SoftPromptModel(
            base,
            PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1),
            PLACEHOLDER,
            trainable=False,
        )
        return model.eval(), tokenizer

    return load


def torch_cpu() -> Any:

    return torch.device("cpu")
