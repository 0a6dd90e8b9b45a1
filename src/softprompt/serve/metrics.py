"""Prometheus metrics of the server, labelled per adapter (`model`)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The server's counters, histograms and gauges in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "softprompt_requests", "HTTP requests.", ["endpoint", "model", "status"],
            registry=r,
        )  # fmt: skip
        self.prompt = Counter("softprompt_prompt_tokens", "Prompt tokens prefilled.", ["model"], registry=r)
        self.generated = Counter("softprompt_generation_tokens", "Tokens generated.", ["model"], registry=r)
        self.ttft = Histogram(
            "softprompt_time_to_first_token_seconds", "Time from arrival to the first token.", ["model"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "softprompt_request_latency_seconds", "Time from arrival to the last token.", ["model"],
            buckets=_LATENCY, registry=r,
        )  # fmt: skip
        self.queue = Gauge("softprompt_queue_depth", "Requests waiting for a place in the batch.", registry=r)
        self.running = Gauge("softprompt_running_rows", "Sequences being decoded.", registry=r)
        self.batch = Histogram(
            "softprompt_batch_size", "Rows per decode step.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )  # fmt: skip
        self.failed = Counter(
            "softprompt_failed_requests", "Requests ended by an error.", ["model"], registry=r
        )
        self.prompt_kv = Gauge(
            "softprompt_prompt_kv", "The prompts' KV cache: hits, misses, evictions, entries, bytes.",
            ["what"], registry=r,
        )  # fmt: skip

    def prompt_cache(self, store: Any) -> None:
        """Copy a `softprompt.core.prefix.PromptKV`'s counters (read when /metrics is scraped)."""
        for what in ("hits", "misses", "evictions"):
            self.prompt_kv.labels(what).set(getattr(store, what))
        self.prompt_kv.labels("entries").set(len(store))
        self.prompt_kv.labels("bytes").set(store.nbytes)

    def request(self, endpoint: str, model: str, status: int) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()

    def prompt_tokens(self, model: str, count: int) -> None:
        self.prompt.labels(model).inc(count)

    def step(self, rows: int, queue_depth: int) -> None:
        self.batch.observe(rows)
        self.running.set(rows)
        self.queue.set(queue_depth)

    def finished(self, req: Any, model: str) -> None:
        """A generation request ended (tokens, time to first token, latency, or failure)."""
        self.generated.labels(model).inc(req.generated)
        if req.error is not None:
            self.failed.labels(model).inc()
            return
        end = req.finished_at or req.created
        if req.first_token_at is not None:
            self.ttft.labels(model).observe(req.first_token_at - req.created)
        self.latency.labels(model).observe(end - req.created)

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "Metrics"]
