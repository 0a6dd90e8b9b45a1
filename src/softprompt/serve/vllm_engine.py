"""Serving on vLLM: the front turns each request into prompt embeddings, vLLM generates.

vLLM (0.10 and later, `--enable-prompt-embeds`) takes a completion's prompt as a tensor of
input embeddings, `(tokens, hidden)`, instead of token ids. A soft prompt is exactly such
rows, so a request for adapter A becomes `[A's prompt; the embeddings of the prompt's
tokens]`, which is what `SoftPromptModel` feeds the base model. The front keeps only what
that takes: the tokenizer and the input-embedding table (`embeddings_only_model`); vLLM
holds the model, on whatever hardware and parallelism it runs.

The HTTP layer is the built-in server's (`softprompt.serve.app`): adapters by name, the
fingerprint check, templates, streaming, `n`, stop strings, seeds, logprobs and
`/v1/classify` behave the same; only the engine differs. Every request is streamed from
vLLM, its token ids fed to the same `Choice` objects the built-in engine feeds (so stop
strings and finish reasons are decided in one place), and the stream is closed, which
aborts the request in vLLM, as soon as every choice is finished or the client is gone.

Classification asks vLLM for one token after `[prompt; template(text)]` with the label
tokens' full-vocabulary log-probabilities (`logprob_token_ids`); a label word of several
tokens takes one such request per further token.

Safety: vLLM warns that prompt embeddings must come from trusted clients (a crafted tensor
can crash it). Only this front should reach vLLM: bind vLLM to 127.0.0.1 or a private
network. Every tensor sent is built here, `(tokens, hidden)` in the model's dtype, finite.

Failures reach the client as OpenAI errors: vLLM not reachable, 503; no answer within the
timeout, 504; vLLM's own errors, 502 with its message (a 400 from vLLM about the request
stays a 400). Nothing waits without a timeout, and nothing is remembered about a failure:
the next request tries again, so the front recovers when vLLM comes back.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import io
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
import transformers
from safetensors import safe_open

from softprompt.base_models import ModelLoadError, model_folder
from softprompt.core.config import PromptPosition
from softprompt.serve import classification
from softprompt.serve.adapters import (
    AdapterMethods,
    AdapterRegistry,
    context_length,
    stop_token_ids,
    stop_worker,
)
from softprompt.serve.errors import InternalError, ServeError, Unavailable
from softprompt.serve.request import GenerationRequest
from softprompt.serve.scheduler import Scheduler
from softprompt.settings import option

logger = logging.getLogger(__name__)


class BadGateway(ServeError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class GatewayTimeout(ServeError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


@dataclass
class VllmSettings:
    """Where vLLM is and how long to wait for it.

    Attributes:
        url: vLLM's OpenAI API base, e.g. "http://127.0.0.1:8000/v1".
        model: The model name vLLM serves (None: the first one `/v1/models` lists).
        timeout_s: Longest wait for vLLM's next bytes (the first token included); then 504.
        connect_timeout_s: Longest wait to connect; then 503.
        api_key: Sent as `Authorization: Bearer` when vLLM was started with `--api-key`.
    """

    url: str = option("", "vLLM's API base, e.g. http://127.0.0.1:8001/v1.")
    model: str | None = option(None, "The model name vLLM serves (default: the first listed).")
    timeout_s: float = option(120.0, "Seconds to wait for vLLM (then 504).", flag="--vllm-timeout")
    connect_timeout_s: float = option(5.0, "Seconds to wait to connect to vLLM (then 503).", cli=False)
    api_key: str | None = option(None, "vLLM's --api-key (or VLLM_API_KEY).", env="VLLM_API_KEY")

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"the vLLM URL must start with http:// or https://; got {self.url!r}.")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("the vLLM timeouts must be positive.")


def encode_embeds(tensor: torch.Tensor) -> str:
    """A `(tokens, hidden)` tensor as vLLM's `prompt_embeds` takes it: base64 of `torch.save`."""
    buffer = io.BytesIO()
    torch.save(tensor.detach().to("cpu").contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class VllmEngine(AdapterMethods):
    """The serving engine over a vLLM server (see the module docstring).

    Args:
        model: A CAUSAL_LM `SoftPromptModel` whose base model has real input embeddings
            (the rest may be on the meta device: `embeddings_only_model`).
        tokenizer: Its tokenizer (the same as vLLM's).
        scheduler: Where requests and jobs come from; its batch size is the number of
            sequences in flight to vLLM at most.
        base_id: The name clients use for the bare model.
        settings: Where vLLM is (`VllmSettings`).
        metrics: A `softprompt.serve.metrics.Metrics` (or None).

    `adapters_dirs` and `allow_base_mismatch` are as for the built-in `Engine`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        scheduler: Scheduler,
        *,
        base_id: str,
        settings: VllmSettings,
        metrics: Any = None,
        adapters_dirs: Any = (),
        allow_base_mismatch: bool = False,
    ) -> None:
        if model.task_type.value != "CAUSAL_LM":
            raise ValueError(f"serving needs a CAUSAL_LM model; this one does {model.task_type.value}.")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.base_id = base_id
        self.settings = settings
        self.metrics = metrics
        self.registry = AdapterRegistry(model, base_id, adapters_dirs, allow_base_mismatch)
        weight = model.base_model.get_input_embeddings().weight
        if weight.device.type == "meta":
            raise ValueError("the model's input embeddings are on the meta device; load them first.")
        self.table = weight.detach()
        self.dtype = weight.dtype
        self.context_length = context_length(model)  # until vLLM's /v1/models says its own
        self.stop_token_ids = stop_token_ids(model, tokenizer)
        self.served_model = settings.model
        self.in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._drain_deadline: float | None = None
        self._jobs = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="softprompt-vllm-job")
        self._client: Any = None
        self.state = "ready"

    # ------------------------------------------------------------------ the interface
    @property
    def description(self) -> str:
        return f"vLLM at {self.settings.url} (model {self.served_model or 'not asked yet'})"

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def observe(self, metrics: Any) -> None:
        metrics.running.set(self.in_flight)

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="softprompt-vllm", daemon=True)
        self._thread.start()
        ready.wait(30)

    def stop(self, drain_seconds: float = 30.0) -> None:
        """Refuse new work, let requests in flight finish (up to `drain_seconds`), then stop."""
        stop_worker(self, drain_seconds)
        self._jobs.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ embeddings
    def embeds(self, adapter: str | None, ids: list[int], at: int | None = None) -> torch.Tensor:
        """`[adapter's prompt; embeddings of ids]`, `(prompt + len(ids), hidden)` in the model's
        dtype; for an adapter placed at a `{prompt}` marker, the prompt goes before `ids[at]`.

        Raises:
            ServeError: An id outside the vocabulary, or a marker adapter without `at`.
            NotFound: The adapter is not served (any more).
        """
        vocab = self.table.shape[0]
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ServeError(
                f"token id {bad} is outside the model's vocabulary (0..{vocab - 1}).", param="prompt"
            )
        rows = self.table[torch.tensor(ids, dtype=torch.long)] if ids else self.table[:0]
        with self.registry.model_lock:  # an adapter replaced meanwhile: the name's current one
            internal = self.registry.internal(adapter)
            if internal is None:
                return rows
            marker = self.model.peft_config[internal].prompt_position == PromptPosition.MARKER
            if marker and at is None:
                raise ServeError(
                    f"adapter {adapter!r} is placed at a {{prompt}} marker: write {{prompt}} once in the "
                    "prompt text, where the soft prompt goes.",
                    param="prompt",
                )
            with torch.no_grad():
                prompt = self.model.prompts[internal](self.dtype).to(rows.device)
        at = at if marker else 0
        return torch.cat([rows[:at], prompt, rows[at:]], dim=0)

    # ------------------------------------------------------------------ classification
    def classify(self, name: str, texts: list[str], max_length: int | None = None) -> list[dict[str, Any]]:
        """Rank classification with the adapter's run template and label words, the label
        tokens' log-probabilities asked of vLLM (a job: runs on the engine's job threads), see
        `softprompt.serve.classification.by_next_token`."""
        return classification.by_next_token(
            self.tokenizer,
            self.registry,
            name,
            texts,
            max_length,
            lambda calls: self._sync(self._label_logprobs_all(name, calls)),
        )

    async def _label_logprobs_all(
        self, name: str, calls: list[classification.Call]
    ) -> classification.Answers:
        limit = asyncio.Semaphore(max(1, self.scheduler.max_batch_size))

        async def one(i: int, ids: list[int], at: int | None, wanted: list[int]) -> tuple[Any, dict]:
            async with limit:
                return (i, tuple(ids)), await self._label_logprobs(name, ids, at, wanted)

        merged: classification.Answers = {}
        for key, values in await asyncio.gather(*(one(*c) for c in calls)):
            merged.setdefault(key, {}).update(values)
        return merged

    async def _label_logprobs(
        self, name: str, ids: list[int], at: int | None, wanted: list[int]
    ) -> dict[int, float]:
        body = {
            "prompt_embeds": encode_embeds(self.embeds(name, ids, at)),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": 1,
            "logprob_token_ids": wanted,
            "return_tokens_as_token_ids": True,
        }
        answer = await self._post_json("/completions", body)
        try:
            top = answer["choices"][0]["logprobs"]["top_logprobs"][0]
            values = {_token_id(k): float(v) for k, v in top.items()}
            return {t: values[t] for t in wanted}
        except (KeyError, IndexError, TypeError, ValueError) as err:
            raise BadGateway(f"vLLM's answer has no log-probabilities of tokens {wanted}: {err!r}") from None

    # ------------------------------------------------------------------ the worker
    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main(ready))
        except BaseException:
            logger.exception("the vLLM worker died")
            self.state = "dead"
            raise
        finally:
            loop.close()
            if self.state != "dead":
                self.state = "stopped"

    async def _main(self, ready: threading.Event) -> None:
        timeout = httpx.Timeout(self.settings.timeout_s, connect=self.settings.connect_timeout_s)
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        headers = {"Authorization": f"Bearer {self.settings.api_key}"} if self.settings.api_key else {}
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
            self._client = client
            self._freed = asyncio.Event()
            ready.set()
            probe = asyncio.get_running_loop().create_task(self._model_name())  # /v1/models' length early
            probe.add_done_callback(
                lambda task: task.cancelled() or task.exception()
            )  # down: asked again later
            loop = asyncio.get_running_loop()
            while True:
                if self._stop.is_set() and (
                    not self._tasks or time.monotonic() > (self._drain_deadline or 0)
                ):
                    break
                for job in self.scheduler.jobs():
                    loop.run_in_executor(self._jobs, job.execute)
                if not self._stop.is_set():
                    for req in self.scheduler.admit(self.in_flight):
                        self._launch(req)
                if self._stop.is_set() or (self.scheduler.queue_depth and self.in_flight):
                    self._freed.clear()
                    try:
                        await asyncio.wait_for(self._freed.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass
                else:
                    await loop.run_in_executor(None, self.scheduler.wait_for_work, 0.05)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)

    def _sync(self, coroutine: Any) -> Any:
        """Run `coroutine` on the worker's loop from another thread and wait for it."""
        if self._loop is None or not self.alive:
            coroutine.close()
            raise Unavailable("the vLLM worker is not running.")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result(self.settings.timeout_s * 4)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise GatewayTimeout(f"vLLM did not answer within {self.settings.timeout_s * 4:g} s.") from None

    def _launch(self, req: GenerationRequest) -> None:
        self.in_flight += req.rows
        task = asyncio.get_running_loop().create_task(self._generate(req))
        self._tasks.add(task)

        def done(task: asyncio.Task, req: GenerationRequest = req) -> None:
            self._tasks.discard(task)
            self.in_flight -= req.rows
            self._freed.set()
            self.scheduler.running_rows = self.in_flight

        task.add_done_callback(done)

    async def _model_name(self) -> str:
        if self.served_model is None:
            answer = await self._get_json("/models")
            try:
                first = answer["data"][0]
                self.served_model = str(first["id"])
                if first.get("max_model_len"):
                    self.context_length = int(first["max_model_len"])
            except (KeyError, IndexError, TypeError) as err:
                raise BadGateway(f"vLLM's /v1/models lists no model: {err!r}") from None
        return self.served_model

    async def _generate(self, req: GenerationRequest) -> None:
        label = req.adapter or self.base_id
        try:
            if req.cancelled.is_set():
                raise Unavailable("cancelled: the client disconnected.")
            body = await self._completion_body(req)
            if self.metrics is not None:
                self.metrics.prompt_tokens(label, len(req.prompt_ids))
            await self._stream(req, body)
        except asyncio.CancelledError:
            req.fail(Unavailable("the server is shutting down."))
            raise
        except Exception as err:
            logger.debug("request %s failed", req.id, exc_info=err)
            req.fail(err if isinstance(err, ServeError) else InternalError(f"generation failed: {err}"))
        finally:
            if self.metrics is not None and req.done.is_set():
                self.metrics.finished(req, label)

    async def _completion_body(self, req: GenerationRequest) -> dict[str, Any]:
        params = req.params
        one = params.greedy and req.n > 1  # vLLM refuses n > 1 when greedy: all n are the same
        body: dict[str, Any] = {
            "model": await self._model_name(),
            "prompt_embeds": encode_embeds(self.embeds(req.adapter, req.prompt_ids, req.prompt_position)),
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": -1,
            "n": 1 if one else req.n,
            "stream": True,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "stop_token_ids": sorted(self.stop_token_ids),
            "skip_special_tokens": True,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logprobs is not None:
            body["logprobs"] = max(params.logprobs, 0)
        return body

    async def _stream(self, req: GenerationRequest, body: dict[str, Any]) -> None:
        url = self.settings.url + "/completions"
        copies = req.n if body["n"] == 1 and req.n > 1 else 1
        try:
            async with self._client.stream("POST", url, json=body) as response:
                if response.status_code != 200:
                    raise self._upstream_error(
                        response.status_code, (await response.aread()).decode(errors="replace")
                    )
                async for line in response.aiter_lines():
                    if req.cancelled.is_set() or req.done.is_set():
                        return  # closing the stream aborts the request in vLLM
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise self._upstream_error(502, json.dumps(chunk))
                    for choice in chunk.get("choices", []):
                        self._feed(req, choice, copies)
        except httpx.HTTPError as err:
            raise self._transport_error(err) from None
        for choice in req.choices:  # vLLM ended without saying why: it reached its limit
            if not choice.finished:
                choice.finish("length")

    def _feed(self, req: GenerationRequest, data: dict[str, Any], copies: int) -> None:
        """Give vLLM's new tokens of one choice (all `copies` choices for a greedy n > 1)."""
        index = int(data.get("index", 0))
        targets = req.choices if copies > 1 else [req.choices[index]]
        ids = data.get("token_ids") or []
        logprobs = data.get("logprobs") or {}
        values = logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or []
        k = req.params.logprobs
        for j, token in enumerate(ids):
            logprob = float(values[j]) if j < len(values) and values[j] is not None else None
            top = None
            if k is not None and j < len(tops) and tops[j]:
                pairs = sorted(((_token_id(t), float(v)) for t, v in tops[j].items()), key=lambda p: -p[1])
                top = pairs[:k]
            for choice in targets:
                if not choice.finished:
                    choice.add(int(token), logprob, top)
        reason = data.get("finish_reason")
        if reason is not None:
            for choice in targets:
                if not choice.finished:
                    choice.finish("length" if reason == "length" else "stop")

    # ------------------------------------------------------------------ plain calls
    async def _get_json(self, path: str) -> Any:
        return await self._call("GET", path, None)

    async def _post_json(self, path: str, body: dict[str, Any]) -> Any:
        if "model" not in body:
            body = {"model": await self._model_name(), **body}
        return await self._call("POST", path, body)

    async def _call(self, method: str, path: str, body: dict[str, Any] | None) -> Any:
        url = self.settings.url + path
        try:
            response = await self._client.request(method, url, json=body)
        except httpx.HTTPError as err:
            raise self._transport_error(err) from None
        if response.status_code != 200:
            raise self._upstream_error(response.status_code, response.text)
        try:
            return response.json()
        except ValueError:
            raise BadGateway(f"vLLM answered {path} with something that is not JSON.") from None

    def _transport_error(self, err: Exception) -> ServeError:
        """What a client sees when the connection to vLLM fails: 503 (not reachable), 504
        (nothing within the timeout) or 502 (anything else)."""
        where = f"vLLM at {self.settings.url}"
        if isinstance(err, httpx.ConnectError):
            return Unavailable(f"{where} is not reachable ({err}); is it running?")
        if isinstance(err, httpx.TimeoutException):
            return GatewayTimeout(f"{where} sent nothing for {self.settings.timeout_s:g} s.")
        return BadGateway(f"the connection to {where} failed: {err!r}")

    def _upstream_error(self, status: int, text: str) -> ServeError:
        try:
            message = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = text[:500]
        if status == 400:
            return ServeError(f"vLLM refused the request: {message}")
        if status == 404:
            return BadGateway(f"vLLM does not serve the model {self.served_model!r}: {message}")
        return BadGateway(f"vLLM answered {status}: {message}")


def _token_id(key: str) -> int:
    """A token id from vLLM's `return_tokens_as_token_ids` form, "token_id:123"."""
    return int(str(key).rsplit(":", 1)[-1])


# ---------------------------------------------------------------------- the front's model
def embeddings_only_model(name_or_path: str | None, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """The base model of `name_or_path` (None: the packaged default) built on the meta device
    with only its input embeddings read from the checkpoint, and its tokenizer: what the vLLM
    front needs to turn tokens and soft prompts into embeddings (SmolLM2-135M: 113 MB in
    float32 instead of 540 MB; a 70B model: its embedding table, 1-4 GB, instead of 140 GB).

    Raises:
        ModelLoadError: The checkpoint has no safetensors weights, or no tensor for the input
            embeddings.
    """

    folder = model_folder(name_or_path)
    config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        base = transformers.AutoModelForCausalLM.from_config(config, trust_remote_code=False, dtype=dtype)
    embedding = base.get_input_embeddings()
    names = [n for n, p in base.named_parameters(remove_duplicate=False) if p is embedding.weight]
    weight = _read_tensor(Path(folder), names, getattr(base, "base_model_prefix", ""))
    if weight is None:
        raise ModelLoadError(
            f"found no input-embedding tensor ({', '.join(names)}) in the safetensors files of {folder}."
        )
    embedding.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
    base.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return base, tokenizer


def _read_tensor(folder: Path, names: list[str], prefix: str) -> torch.Tensor | None:

    wanted: list[str] = []
    for name in names:
        wanted += [name, name.removeprefix(prefix + ".")] if prefix else [name]
        if prefix and not name.startswith(prefix + "."):
            wanted.append(f"{prefix}.{name}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [(key, folder / weight_map[key]) for key in wanted if key in weight_map]
    else:
        files = [(key, path) for path in sorted(folder.glob("*.safetensors")) for key in wanted]
    for key, path in files:
        with safe_open(str(path), framework="pt") as f:
            if key in f.keys():  # noqa: SIM118  (a safe_open handle is not a dict)
                return f.get_tensor(key)
    return None
