"""Admission and iteration-level batching: which requests run, and when.

The scheduler holds a bounded queue of requests that wait for a place in the running
batch, and a queue of jobs (classification, adapter updates) for the model thread. It
never touches the model: the engine's worker asks it, between two decode steps, which
requests join the batch now (`admit`) and which jobs to run. A full queue refuses new
work at once (`Overloaded`, HTTP 429 with Retry-After) instead of growing without bound;
a cancelled request (client gone) leaves the queue, or the batch at the next step.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from softprompt.serve.errors import Overloaded, ServeError, Unavailable
from softprompt.serve.request import GenerationRequest, Job


class Scheduler:
    """A bounded FIFO of generation requests and jobs, shared by the HTTP layer and the engine.

    Args:
        max_batch_size: Rows (choices) decoded together at most.
        max_queue: Requests and jobs waiting at most; more are refused.
        max_joins_per_step: New requests prefilled between two decode steps at most, so a
            burst of arrivals does not stall the running batch for long.
        burst_quiet_s, burst_limit_s: An idle engine that gets a request lets the rest of
            its burst come in (`gather_burst`): it waits until no request came for
            `burst_quiet_s`, at most `burst_limit_s`.
        clock: Seconds now, for arrivals and the burst wait (`time.monotonic`).
        wait: How the burst wait waits: `wait(condition, seconds)`, called with the
            scheduler's lock held, returns when `condition` is notified (an arrival, `close`)
            or `seconds` have passed (`threading.Condition.wait`). With `clock`, tests drive time.
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        max_queue: int = 256,
        max_joins_per_step: int = 64,
        burst_quiet_s: float = 0.002,
        burst_limit_s: float = 0.02,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Condition, float], object] = threading.Condition.wait,
    ) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_joins_per_step < 1:
            raise ValueError("max_batch_size, max_queue and max_joins_per_step must be at least 1.")
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_joins_per_step = max_joins_per_step
        self.burst_quiet_s = burst_quiet_s
        self.burst_limit_s = burst_limit_s
        self._clock = clock
        self._wait = wait
        self._last_arrival = float("-inf")
        self._waiting: deque[GenerationRequest] = deque()
        self._jobs: deque[Job] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self.running_rows = 0  # set by the engine after each step
        self.step_seconds = 0.05  # the engine's recent step time (for Retry-After)

    # ------------------------------------------------------------------ HTTP side
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request.

        Raises:
            ServeError: The request can never fit a batch (400), or the queue is full (429),
                or the server is shutting down (503).
        """
        if request.rows > self.max_batch_size:
            raise ServeError(
                f"n={request.rows} is more than this server's batch size ({self.max_batch_size}).", param="n"
            )
        with self._lock:
            self._check_open()
            if len(self._waiting) + len(self._jobs) >= self.max_queue:
                raise Overloaded(
                    f"the server is busy ({len(self._waiting)} requests waiting); retry shortly.",
                    retry_after=self.retry_after(),
                )
            self._waiting.append(request)
            self._last_arrival = self._clock()
            self._wake.notify_all()

    def submit_job(self, job: Job) -> None:
        """Queue work for the model thread (classification, adapter updates)."""
        with self._lock:
            self._check_open()
            if len(self._waiting) + len(self._jobs) >= self.max_queue:
                raise Overloaded("the server is busy; retry shortly.", retry_after=self.retry_after())
            self._jobs.append(job)
            self._wake.notify_all()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down.")

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about the time to drain the queue once."""
        batches = 1 + len(self._waiting) // max(1, self.max_batch_size)
        return max(1, min(60, round(batches * self.step_seconds * 16)))

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    def cancel(self, request: GenerationRequest) -> None:
        """The client is gone: the request leaves the queue now or the batch at the next step."""
        request.cancel()
        with self._lock:
            try:
                self._waiting.remove(request)
            except ValueError:
                return
        request.fail(Unavailable("cancelled: the client disconnected."))

    # ------------------------------------------------------------------ engine side
    def jobs(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
        return jobs

    def admit(self, running_rows: int) -> list[GenerationRequest]:
        """Requests that join the batch now, first come first served, within the batch size."""
        out: list[GenerationRequest] = []
        free = self.max_batch_size - running_rows
        with self._lock:
            while self._waiting and len(out) < self.max_joins_per_step:
                head = self._waiting[0]
                if head.cancelled.is_set():
                    self._waiting.popleft()
                    continue
                if head.rows > free:
                    break  # keep the order: the head waits for room, later requests wait behind it
                self._waiting.popleft()
                free -= head.rows
                out.append(head)
        return out

    def gather_burst(self) -> None:
        """Called by an idle engine with requests waiting: let the rest of their burst arrive.

        Clients that send together (a page of prompts, the clients of requests that just
        ended) reach the queue a millisecond or two apart. A step that starts on the first
        of them makes the others wait a whole step, then prefill in a step of their own. So
        while the newest waiting request came less than `burst_quiet_s` ago, this waits
        (`burst_limit_s` at most); a lone request pays `burst_quiet_s`. Not done while rows
        decode: they would wait too, and measured, it changed nothing there (the next
        requests of clients whose requests just ended came 10-40 ms later, not within 2 ms).
        """
        deadline = self._clock() + self.burst_limit_s
        with self._lock:
            while self._waiting and not self._closed:
                now = self._clock()
                wait = min(self._last_arrival + self.burst_quiet_s, deadline) - now
                if wait <= 0:
                    return
                self._wait(self._wake, wait)

    def wait_for_work(self, timeout: float) -> None:
        """Block the idle model thread until something is queued (or `timeout` passes)."""
        with self._lock:
            if not self._waiting and not self._jobs and not self._closed:
                self._wake.wait(timeout)

    def close(self) -> list[GenerationRequest]:
        """Refuse new work; give back the requests that never started."""
        with self._lock:
            self._closed = True
            left = list(self._waiting)
            self._waiting.clear()
            self._wake.notify_all()
        return left

    @property
    def closed(self) -> bool:
        return self._closed

    def pending_jobs(self) -> list[Job]:
        with self._lock:
            jobs = list(self._jobs)
            self._jobs.clear()
        return jobs
