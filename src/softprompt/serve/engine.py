"""The built-in engine: one worker thread that owns the model, runs the jobs (adapter
changes, classification) between steps, and drives a batcher (`softprompt.serve.batching`:
packed steps by default, padded batches for a model whose attention cannot be packed),
which prefills the admitted requests and decodes the running rows. Every row gives the
numbers it gives alone, checked against `SoftPromptModel.generate` in the tests.

After the prefill a row no longer needs its adapter (its prompt is in its KV), so decode
steps run the whole batch as the bare model, whatever adapter each row started with, and
an adapter can be replaced or removed while its requests finish.

Adapters are known by their served name (`softprompt.serve.adapters.AdapterRegistry`);
inside the model each load gets a fresh internal name, so replacing an adapter is atomic.
All model changes happen on the worker thread (as `Job`s between steps). The engine never
sees HTTP.

Keep every torch computation of a served process on this thread (the server loads the
model in a thread that ends before serving starts). Another live thread that has run
torch's parallel CPU ops keeps its own OpenMP thread pool; with more OpenMP threads than
CPUs, GNU OpenMP stops spin-waiting between parallel regions, and on the 2-core test
machine a one-row decode step went from about 50 ms to about 75 ms.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from softprompt.core.prefix import PromptKV, supports_prefix_cache
from softprompt.serve import batching, classification
from softprompt.serve.adapters import (  # noqa: F401  (find_adapter_folder, scan_adapters: re-exported)
    ADAPTER_NAME,
    AdapterMethods,
    AdapterRegistry,
    context_length,
    find_adapter_folder,
    scan_adapters,
    stop_token_ids,
    stop_worker,
)
from softprompt.serve.errors import InternalError, Unavailable
from softprompt.serve.scheduler import Scheduler

logger = logging.getLogger(__name__)

PLACEHOLDER = "_serve_placeholder_"


class Engine(AdapterMethods):
    """One worker thread running a `SoftPromptModel` for many adapters at once.

    Args:
        model: A CAUSAL_LM `SoftPromptModel` whose base model takes a plain KV cache.
        tokenizer: Its tokenizer.
        scheduler: Where requests and jobs come from.
        base_id: The name clients use for the bare model.
        metrics: A `softprompt.serve.metrics.Metrics` (or None).
        prompt_cache_mb: Memory budget for the prompts' KV (None: unbounded).
        adapters_dirs: Folders searched for adapters requested by name (just in time).
        allow_base_mismatch: Load adapters saved from a different base model of the same
            width (refused by default, see `softprompt.core.adapter_files.base_fingerprint`).
        packed: Run packed steps (`softprompt.serve.batching.PackedBatcher`: prefill chunks
            and decode tokens of all rows in one forward, no padding); None: where the model
            passes a start-up check, else padded batches (`PaddedBatcher`).
        prefill_tokens: Packed steps: prompt tokens prefilled per step at most (the rest
            in the next steps), so a burst of long prompts does not stall decoding.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        scheduler: Scheduler,
        *,
        base_id: str,
        metrics: Any = None,
        prompt_cache_mb: float | None = None,
        adapters_dirs: list[Path] | tuple[Path, ...] = (),
        allow_base_mismatch: bool = False,
        packed: bool | None = None,
        prefill_tokens: int = 256,
    ) -> None:
        if model.task_type.value != "CAUSAL_LM":
            raise ValueError(f"serving needs a CAUSAL_LM model; this one does {model.task_type.value}.")
        if not supports_prefix_cache(model.base_model):
            raise ValueError(
                f"{type(model.base_model).__name__} keeps a KV cache that is not plain per-layer keys and "
                "values (sliding-window, chunked or recurrent layers); the server cannot batch it."
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.base_id = base_id
        self.metrics = metrics
        budget = None if prompt_cache_mb is None else int(prompt_cache_mb * 2**20)
        model.prompt_kv = PromptKV(budget)
        self.dtype = model.base_model.get_input_embeddings().weight.dtype
        self.context_length = context_length(model)
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.registry = AdapterRegistry(model, base_id, adapters_dirs, allow_base_mismatch)
        self.batcher = batching.choose(
            model,
            self.registry,
            self.dtype,
            packed=packed,
            prefill_tokens=prefill_tokens,
            metrics=metrics,
            base_id=base_id,
        )
        logger.info("decoding in %s", "packed steps" if self.packed else "padded batches")
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self.state = "ready"
        self.steps = 0

    @property
    def packed(self) -> bool:
        """Whether the batch runs in packed steps (else padded batches)."""
        return self.batcher.packed

    @property
    def description(self) -> str:
        return f"{self.model.device} in {str(self.dtype).removeprefix('torch.')}"

    def observe(self, metrics: Any) -> None:
        metrics.prompt_cache(self.model.prompt_kv)

    def classify(self, name: str, texts: list[str], max_length: int | None = None) -> list[dict[str, Any]]:
        """Rank classification with the adapter's run template and label words (a job: on the
        worker thread), see `softprompt.serve.classification`."""
        return classification.on_model(self.model, self.tokenizer, self.registry, name, texts, max_length)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Refuse new work, let running requests finish (up to `drain_seconds`), then stop."""
        stop_worker(self, drain_seconds)

    def _run(self) -> None:
        batcher = self.batcher
        try:
            while True:
                if self._stop.is_set() and (not batcher or time.monotonic() > (self._drain_deadline or 0)):
                    break
                for job in self.scheduler.jobs():
                    job.execute()
                if not self._stop.is_set():
                    if not batcher:
                        self.scheduler.gather_burst()
                    joining = self.scheduler.admit(len(batcher))
                    if joining:
                        batcher.join(joining)
                if batcher:
                    self._step()
                else:
                    self.scheduler.running_rows = 0
                    batcher.when_idle()
                    if not self._stop.is_set():
                        self.scheduler.wait_for_work(0.1)
        except BaseException:  # a bug: report it, fail what is running, mark the engine dead
            logger.exception("the model worker died")
            self.state = "dead"
            batcher.fail_all(InternalError("the model worker stopped; see the server log."))
            raise
        finally:
            batcher.fail_all(Unavailable("the server is shutting down."))
            if self.state != "dead":
                self.state = "stopped"

    def _step(self) -> None:
        """One step of the batcher, timed for the scheduler's admission and the metrics."""
        stepped = self.batcher.step()
        if stepped:
            self.steps += 1
            self.scheduler.step_seconds = 0.9 * self.scheduler.step_seconds + 0.1 * self.batcher.seconds
            if self.metrics is not None:
                self.metrics.step(stepped, self.scheduler.queue_depth)
        self.scheduler.running_rows = len(self.batcher)
