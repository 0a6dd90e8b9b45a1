"""The serving engine and scheduler in-process: exactness against `SoftPromptModel.generate`
with requests of several adapters joining mid-decode, seeds, faults, the prompt-KV budget."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("prometheus_client")

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.core.prefix import PromptKV
from softprompt.serve.batching.padded import PaddedKV
from softprompt.serve.engine import PLACEHOLDER, Engine
from softprompt.serve.errors import Overloaded
from softprompt.serve.request import GenerationRequest, Job, SamplingParams, _stream_safe
from softprompt.serve.scheduler import Scheduler
from tests.tiny import build_model, make_tokenizer

PROMPTS = {"a": 4, "b": 9, "c": 2}
TEXTS = [
    "good movie",
    "the plot was very boring and",
    "love it",
    "awful acting so bad the worst film ever",
    "fun",
]


def _model(arch: str) -> SoftPromptModel:
    torch.manual_seed(0)
    model = SoftPromptModel(
        build_model("CAUSAL_LM", arch),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1),
        PLACEHOLDER,
        trainable=False,
    )
    for name, tokens in PROMPTS.items():
        model.add_adapter(
            name, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens), trainable=False
        )
        with torch.no_grad():
            model.prompts[name].embedding.normal_(0, 2.0)
    return model.eval()


MODES = pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])


def _engine(model, tok, scheduler_kw=None, **kw) -> Engine:
    sched = Scheduler(
        max_batch_size=kw.pop("max_batch_size", 16), max_queue=kw.pop("max_queue", 64), **(scheduler_kw or {})
    )
    engine = Engine(model, tok, sched, base_id="base", **kw)
    assert engine.packed == kw.get("packed", engine.packed)
    for name in PROMPTS:  # serve the model's own adapters under their names
        engine.registry.adopt(name, name)
    return engine


def _request(engine, tok, text, adapter, max_tokens, **kw):
    params = SamplingParams(
        max_tokens=max_tokens, temperature=kw.pop("temperature", 0.0), **kw.pop("params", {})
    )
    return GenerationRequest(
        adapter,
        tok(text, add_special_tokens=False)["input_ids"],
        params,
        n=kw.pop("n", 1),
        decode=lambda ids: tok.decode(ids, skip_special_tokens=True),
        stop_token_ids=engine.stop_token_ids,
        **kw,
    )


def _expected(model, req) -> list[int]:
    ids = torch.tensor([req.prompt_ids])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        adapter_names=[req.adapter or "__base__"],
        max_new_tokens=req.params.max_tokens,
        do_sample=False,
    )
    return out[0, ids.shape[1] :].tolist()


def _matches(tokens: list[int], expected: list[int], stops) -> bool:
    """generate pads after EOS: compare up to and including the first stop token."""
    cut = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))
    return tokens == expected[:cut]


def _mixed_requests(engine, tok) -> list:
    """Ten requests: adapters a, b, none and c, different lengths, some with n=2."""
    return [
        _request(engine, tok, text, ["a", "b", None, "c"][j % 4], 3 + 2 * (j % 4), n=1 + (j % 3 == 1))
        for j, text in enumerate(TEXTS * 2)
    ]


def _assert_each_equals_generate(model, engine, reqs) -> None:
    """Every request succeeded and each of its choices is greedy `generate` of its prompt."""
    for r in reqs:
        assert r.error is None
        expected = _expected(model, r)
        for c in r.choices:
            assert _matches(c.tokens, expected, engine.stop_token_ids), (r.adapter, c.tokens, expected)


def _serve_all(engine, reqs) -> None:
    """Queue `reqs` before the engine starts, let the engine serve them all, stop it."""
    for r in reqs:
        engine.scheduler.submit(r)
    engine.start()
    try:
        for r in reqs:
            assert r.done.wait(60)
    finally:
        engine.stop(5)


def _before_each_step(monkeypatch, engine, hook) -> None:
    """Run `hook()` on the worker thread before each decode step (packed or padded): what it
    queues joins at the next admission, while the batch's rows are decoding."""
    step = engine.batcher.step
    monkeypatch.setattr(engine.batcher, "step", lambda: (hook(), step())[1])


class _TestTime:
    """The scheduler's clock and burst wait, driven by the test (`Scheduler(clock=t, wait=t.wait)`).

    Time moves only in `advance`. A wait ends when the scheduler is notified (an arrival,
    an `advance`), never because time passed (a real 60 s bound only stops a hang). After
    an arrival or an advance the gathering thread either waits again or returns, which
    `act` tells apart without guessing how long it takes."""

    def __init__(self) -> None:
        self.now = 0.0
        self._cond: threading.Condition | None = None
        self._seen = threading.Condition()
        self.waits = 0
        self._returned = False

    def __call__(self) -> float:
        return self.now

    def wait(self, cond: threading.Condition, seconds: float) -> None:
        assert seconds > 0
        with self._seen:
            self._cond = cond
            self.waits += 1
            self._seen.notify_all()
        cond.wait(60)  # called with the scheduler's lock held; released while waiting

    def waiting(self, count: int = 1) -> bool:
        """Whether the scheduler began its `count`-th wait (and `gather` did not return)."""
        with self._seen:
            self._seen.wait_for(lambda: self.waits >= count or self._returned, 60)
            return self.waits >= count and not self._returned

    def advance(self, seconds: float) -> None:
        if self._cond is None:
            self.now += seconds
            return
        with self._cond:
            self.now += seconds
            self._cond.notify_all()

    def returned(self) -> None:
        """Called once `gather_burst` returned (by `gather`'s thread, or an engine's first step)."""
        with self._seen:
            self._returned = True
            self._seen.notify_all()

    def gather(self, s: Scheduler) -> threading.Thread:
        """`s.gather_burst()` on a thread; returns once it waits (or returned)."""
        with self._seen:
            self._returned = False
            count = self.waits + 1
        thread = threading.Thread(target=lambda: (s.gather_burst(), self.returned()), daemon=True)
        thread.start()
        self.waiting(count)
        return thread

    def act(self, action) -> bool:
        """Do `action` (an arrival or an advance, which wake the gathering thread); True if
        `gather_burst` then waits again, False if it returned."""
        with self._seen:
            count = self.waits + 1
        action()
        return self.waiting(count)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@MODES
def test_greedy_equals_generate_with_adapters_joining_mid_decode(arch, packed, monkeypatch):
    tok = make_tokenizer()
    model = _model(arch)
    engine = _engine(model, tok, packed=packed)
    reqs = []
    for j, text in enumerate(TEXTS * 3):
        adapter = ["a", "b", "c", None][j % 4]
        reqs.append(_request(engine, tok, text, adapter, 4 + 3 * (j % 5), n=1 + (j % 3 == 0)))
    later = list(reqs[1:])

    def submit_next() -> None:  # staggered, one a step: each joins while earlier ones decode
        if later:
            engine.scheduler.submit(later.pop(0))

    _before_each_step(monkeypatch, engine, submit_next)
    joins = []  # (rows decoding, requests joining) at each admission that let some in
    admit = engine.scheduler.admit

    def admit_counted(running_rows: int) -> list:
        out = admit(running_rows)
        if out:
            joins.append((running_rows, len(out)))
        return out

    monkeypatch.setattr(engine.scheduler, "admit", admit_counted)
    engine.scheduler.submit(reqs[0])
    engine.start()
    try:
        for r in reqs:
            assert r.done.wait(60)
        assert engine.steps > 0
        _assert_each_equals_generate(model, engine, reqs)
    finally:
        engine.stop(5)
    # the first joined an idle engine, every later one alone, next to rows decoding
    assert len(joins) == len(reqs) and joins[0] == (0, 1)
    assert all(rows > 0 and joining == 1 for rows, joining in joins[1:]), joins


def test_batch_merging_keeps_rows_aligned():
    b = PaddedKV()
    k1 = torch.arange(2 * 3, dtype=torch.float).view(1, 1, 6, 1)[:, :, :3].expand(2, 1, 3, 1)
    b.add([object(), object()], [(k1, k1)])
    k2 = torch.ones(1, 1, 5, 1)
    rows = [type("R", (), {"length": 3})(), type("R", (), {"length": 3})(), type("R", (), {"length": 5})()]
    b.rows = rows[:2]
    b.add([rows[2]], [(k2, k2)])
    assert b.width == 5 and b.kv[0][0].shape == (3, 1, 5, 1)
    assert b.kv[0][0][0, 0, :2].abs().sum() == 0  # left padding
    b.keep([0, 1])
    assert b.width == 3 and torch.equal(b.kv[0][0][0], k1[0])


@MODES
def test_seeded_sampling_reproduces_and_n_shares_the_prefill(packed):
    tok = make_tokenizer()
    model = _model("llama")
    engine = _engine(model, tok, packed=packed)
    engine.start()
    try:

        def run(seed):
            r = _request(
                engine, tok, "good movie", "b", 12, temperature=0.9, n=3, params={"seed": seed, "top_p": 0.9}
            )
            engine.scheduler.submit(r)
            assert r.done.wait(30) and r.error is None
            return [c.tokens for c in r.choices]

        first, again, other = run(7), run(7), run(8)
        assert first == again
        assert first != other
        assert len({tuple(t) for t in first}) > 1  # the n choices differ
    finally:
        engine.stop(5)


@MODES
def test_a_request_that_raises_in_the_worker_fails_alone(packed):
    tok = make_tokenizer()
    model = _model("gpt2")
    engine = _engine(model, tok, packed=packed)
    engine.start()
    try:
        good = [_request(engine, tok, t, a, 10) for t, a in zip(TEXTS, ["a", "b", "c", None, "a"])]
        bad = _request(engine, tok, "fun movie", "b", 10)

        def explode(ids):
            if len(ids) >= 2:
                raise RuntimeError("boom")
            return ""

        bad.decode = explode
        for r in [*good[:2], bad, *good[2:]]:
            engine.scheduler.submit(r)
        for r in [*good, bad]:
            assert r.done.wait(30)
        assert bad.error is not None and "boom" in bad.error.message and bad.error.status == 500
        _assert_each_equals_generate(model, engine, good)  # n=1: their one choice each
        assert engine.alive
    finally:
        engine.stop(5)


@MODES
def test_unloading_an_adapter_mid_request_finishes_on_its_prompt(tmp_path, packed, monkeypatch):
    tok = make_tokenizer()
    model = _model("llama")
    model.save_pretrained(tmp_path / "b", selected_adapters=["b"])
    reference = _request(None or _engine(model, tok, packed=packed), tok, "good movie", "b", 40)
    expected = _expected(model, reference)
    engine = _engine(model, tok, packed=packed)
    engine.load_adapter_now("bb", tmp_path / "b")
    r = _request(engine, tok, "good movie", "bb", 40)
    unloaded_at = []  # tokens r had when the unload ran (on the worker, between two steps)

    def unload() -> None:
        unloaded_at.append(None if r.done.is_set() else len(r.choices[0].tokens))
        engine.unload_adapter_now("bb")

    job = Job(unload)
    queued = []

    def unload_after_the_first_token() -> None:
        if r.choices[0].tokens and not queued:
            queued.append(job)
            engine.scheduler.submit_job(job)  # runs before the next step

    _before_each_step(monkeypatch, engine, unload_after_the_first_token)
    engine.start()
    try:
        engine.scheduler.submit(r)
        assert job.done.wait(20) and job.error is None
        assert unloaded_at[0] is not None and 0 < unloaded_at[0] < len(expected), (unloaded_at, expected)
        assert r.done.wait(30) and r.error is None
        assert _matches(r.choices[0].tokens, expected, engine.stop_token_ids)
        late = _request(engine, tok, "good movie", "bb", 4)
        engine.scheduler.submit(late)
        assert late.done.wait(10) and late.error is not None and late.error.status == 404
    finally:
        engine.stop(5)


@MODES
def test_prompt_cache_budget_evicts_least_recently_used_and_recomputes(packed):
    tok = make_tokenizer()
    model = _model("gpt2")
    # the KVs of a and b (8.3 kB), not all three
    engine = _engine(model, tok, prompt_cache_mb=0.008, packed=packed)
    store = model.prompt_kv
    assert isinstance(store, PromptKV)
    engine.start()
    try:
        for rounds in range(2):
            for name in ["a", "b", "c"]:
                r = _request(engine, tok, "good movie", name, 3)
                engine.scheduler.submit(r)
                assert r.done.wait(20) and r.error is None
                assert _matches(r.choices[0].tokens, _expected(model, r), engine.stop_token_ids)
        assert store.nbytes <= store.budget_bytes
        assert store.evictions > 0
    finally:
        engine.stop(5)


def test_scheduler_bounds_the_queue_and_keeps_order():
    s = Scheduler(max_batch_size=4, max_queue=2)
    reqs = [GenerationRequest("a", [1], SamplingParams(max_tokens=1), n=n) for n in (3, 2, 1)]
    s.submit(reqs[0])
    s.submit(reqs[1])
    with pytest.raises(Overloaded) as err:
        s.submit(reqs[2])
    assert err.value.status == 429 and err.value.retry_after >= 1
    assert s.admit(0) == [reqs[0]]  # the next (n=2) does not fit beside it: it waits, in order
    assert s.admit(3) == []
    s.cancel(reqs[1])
    assert reqs[1].done.is_set() and s.queue_depth == 0
    with pytest.raises(Exception, match="batch size"):
        s.submit(GenerationRequest("a", [1], SamplingParams(max_tokens=1), n=5))


def test_an_idle_engine_gathers_a_burst_and_stops_at_its_limit():
    """The burst wait on the test's clock (binary fractions of a second: exact sums)."""
    t = _TestTime()
    s = Scheduler(burst_quiet_s=0.5, burst_limit_s=30, clock=t, wait=t.wait)
    s.gather_burst()  # nothing queued: returns at once, without waiting
    assert t.waits == 0
    one = [GenerationRequest("a", [1], SamplingParams(max_tokens=1)) for _ in range(5)]
    s.submit(one[0])
    thread = t.gather(s)
    assert t.waiting(), "a lone request did not wait for the rest of its burst"
    for r in one[1:]:  # each 0.25 s after the one before: 1 s in all, twice the quiet time
        assert t.act(lambda: t.advance(0.25))
        assert t.act(lambda r=r: s.submit(r)), "the wait ended with the burst still arriving"
    assert t.act(lambda: t.advance(0.375))  # 0.375 s since the last: not quiet yet
    assert not t.act(lambda: t.advance(0.125)), "no arrival for burst_quiet_s, yet it waits on"
    thread.join(60)
    assert s.admit(0) == one
    # a stream that never goes quiet: the wait ends at the limit, the rest come later
    t = _TestTime()
    s = Scheduler(max_queue=500, burst_quiet_s=0.5, burst_limit_s=2, clock=t, wait=t.wait)
    stream = [GenerationRequest("a", [1], SamplingParams(max_tokens=1)) for _ in range(9)]
    s.submit(stream[0])
    thread = t.gather(s)
    assert t.waiting()
    for r in stream[1:8]:  # every 0.25 s until 1.75 s
        assert t.act(lambda: t.advance(0.25))
        assert t.act(lambda r=r: s.submit(r)), "the wait ended before its limit"
    assert not t.act(lambda: t.advance(0.25)), "the wait went on past burst_limit_s"
    thread.join(60)
    assert s.queue_depth == 8  # the ones that came by the limit
    s.submit(stream[8])
    assert s.admit(0) == stream


@MODES
def test_a_burst_reaching_an_idle_engine_is_prefilled_in_one_step(packed, monkeypatch):
    """Requests arriving 0.25 s apart on the scheduler's clock (within the 0.5 s quiet time)
    join in one step."""
    model = _model("llama")
    tok = make_tokenizer()
    t = _TestTime()
    quiet = {"burst_quiet_s": 0.5, "burst_limit_s": 30, "clock": t, "wait": t.wait}
    engine = _engine(model, tok, packed=packed, scheduler_kw=quiet)
    sizes = []
    _before_each_step(monkeypatch, engine, lambda: (sizes.append(len(engine.batcher)), t.returned()))
    reqs = _mixed_requests(engine, tok)[:6]
    engine.scheduler.submit(reqs[0])
    engine.start()
    try:
        assert t.waiting(), "the idle engine did not wait for the rest of the burst"
        for r in reqs[1:]:
            assert t.act(lambda: t.advance(0.25))
            assert t.act(lambda r=r: engine.scheduler.submit(r)), "it stepped with the burst still arriving"
        assert not t.act(lambda: t.advance(0.5)), "quiet for burst_quiet_s, yet it waits on"
        for r in reqs:
            assert r.done.wait(60)
    finally:
        engine.stop(5)
    assert sizes[0] == sum(r.n for r in reqs)  # without the wait: 1 (the first alone)
    _assert_each_equals_generate(model, engine, reqs)


@MODES
def test_requests_joining_together_compute_their_missing_prompts_in_one_pass(packed, monkeypatch):
    model = _model("llama")
    tok = make_tokenizer()
    engine = _engine(model, tok, packed=packed)
    passes = []
    compute = PromptKV._compute

    def counted(model, names, dtype, with_logits):
        passes.append(list(names))
        return compute(model, names, dtype, with_logits)

    monkeypatch.setattr(PromptKV, "_compute", staticmethod(counted))
    reqs = [_request(engine, tok, TEXTS[i], name, 4) for i, name in enumerate(["a", "b", None, "c", "a"])]
    _serve_all(engine, reqs)
    assert passes == [["a", "b", "c"]]  # not one pass per adapter
    _assert_each_equals_generate(model, engine, reqs)


def test_kv_slots_grown_past_the_idle_limit_are_released_when_idle(monkeypatch):
    import softprompt.serve.batching.packed as packed_batcher

    model = _model("llama")
    tok = make_tokenizer()
    engine = _engine(model, tok, packed=True)
    engine.start()
    try:
        for limit, released in ((2**40, False), (0, True), (2**40, False)):
            monkeypatch.setattr(packed_batcher, "IDLE_SLOTS_BYTES", limit)
            reqs = _mixed_requests(engine, tok)[:4]
            for r in reqs:
                engine.scheduler.submit(r)
            for r in reqs:
                assert r.done.wait(60)
            deadline = time.monotonic() + 10
            while (engine.batcher.slots is None) != released and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (engine.batcher.slots is None) == released
            _assert_each_equals_generate(model, engine, reqs)  # the third on slots made anew
    finally:
        engine.stop()


def test_stream_safe_holds_back_a_possible_stop_string():
    assert _stream_safe("hello wor", ("world",)) == len("hello ")
    assert _stream_safe("hello", ("xyz",)) == 5
    assert _stream_safe("ab\ufffd", ()) == 2


def test_prompt_kv_budget_keeps_the_most_recently_used_and_counts():
    model = _model("llama")
    with torch.no_grad():
        probe = PromptKV()
        for name in PROMPTS:
            probe.get(model, name, torch.float32, True)
        total = probe.nbytes
        assert len(probe) == 3 and all(n in probe for n in PROMPTS) and probe.misses == 3
        store = PromptKV(budget_bytes=total - 1)  # everything but the least recently used fits
        for name in ["a", "b", "c"]:
            store.get(model, name, torch.float32, True)
        assert "a" not in store and "b" in store and "c" in store and store.evictions == 1
        store.get(model, "b", torch.float32, True)  # a hit: b becomes the most recently used
        assert store.hits == 1
        store.get(model, "a", torch.float32, True)  # a miss: evicts c, now the least recent
        assert "c" not in store and {"a", "b"} <= {n for n in PROMPTS if n in store}
        assert store.nbytes <= store.budget_bytes and store.misses == 4 and store.evictions == 2
        assert store.evict("a") and not store.evict("a") and "a" not in store
        tiny = PromptKV(budget_bytes=1)  # one state alone over budget: used, not kept
        state = tiny.get(model, "b", torch.float32, True)
        assert state.kv and len(tiny) == 0 and tiny.nbytes == 0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_prefill_of_mixed_adapters_and_lengths_equals_generate(arch):
    """Padded batches: requests queued before the worker starts are prefilled in one forward
    pass: rows of different adapters (and none), prompt lengths and text lengths, n > 1,
    left-padded."""
    tok = make_tokenizer()
    model = _model(arch)
    engine = _engine(model, tok, max_batch_size=64, packed=False)
    together = []
    prefill = engine.batcher._prefill_together
    engine.batcher._prefill_together = lambda shared: together.append(len(shared)) or prefill(shared)
    reqs = _mixed_requests(engine, tok)
    _serve_all(engine, reqs)
    assert together and together[0] == len(reqs)
    _assert_each_equals_generate(model, engine, reqs)


@MODES
def test_batched_prefill_bare_rows_only_and_a_bad_request_fails_alone(packed):
    tok = make_tokenizer()
    model = _model("llama")
    engine = _engine(model, tok, packed=packed)
    good = [_request(engine, tok, t, None, 6) for t in TEXTS]
    bad = _request(engine, tok, "fun movie", "a", 6)
    bad.prompt_ids = [10_000]  # out of the vocabulary: the shared forward raises, then this one alone
    for r in [*good[:2], bad, *good[2:]]:
        engine.scheduler.submit(r)
    engine.start()
    try:
        for r in [*good, bad]:
            assert r.done.wait(30)
        # packed: refused at its join, as it would fail the whole step
        assert bad.error is not None and bad.error.status == (400 if packed else 500)
        _assert_each_equals_generate(model, engine, good)  # n=1: their one choice each
        assert engine.alive
    finally:
        engine.stop(5)


def test_a_packed_step_that_raises_fails_the_requests_prefilled_in_it(monkeypatch):
    """The packed forward raises while one request prefills: it fails; the rows decoding
    next to it step again and give their `generate` tokens."""
    from softprompt.serve import packed as packed_module

    tok = make_tokenizer()
    model = _model("llama")
    engine = _engine(model, tok, packed=True)
    real = packed_module.packed_forward
    poison = [7] * 6

    def forward(base, key, ids, *args):
        tokens = ids.tolist()
        if any(tokens[i : i + 6] == poison for i in range(len(tokens))):
            raise RuntimeError("boom in the step")
        return real(base, key, ids, *args)

    monkeypatch.setattr(packed_module, "packed_forward", forward)
    good = [_request(engine, tok, t, a, 12) for t, a in zip(TEXTS, ["a", "b", None, "c", "a"])]
    bad = _request(engine, tok, "fun", "b", 6)
    bad.prompt_ids = poison
    queued, beside_bad = [], []  # beside_bad: the good requests in the step that prefills bad

    def submit_bad_once_all_decode() -> None:  # on the worker: bad joins at the next admission
        in_step = {id(row.request) for row in engine.batcher.rows}
        if id(bad) in in_step and not beside_bad:
            beside_bad.extend(r for r in good if id(r) in in_step)
        if not queued and all(r.choices[0].tokens for r in good):
            queued.append(bad)
            engine.scheduler.submit(bad)

    _before_each_step(monkeypatch, engine, submit_bad_once_all_decode)
    engine.start()
    try:
        for r in good:
            engine.scheduler.submit(r)
        for r in [*good, bad]:
            assert r.done.wait(30)
        assert beside_bad == good  # bad prefilled in a step with all of them decoding
        assert bad.error is not None and "boom in the step" in bad.error.message
        _assert_each_equals_generate(model, engine, good)
        assert engine.alive
    finally:
        engine.stop(5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2", "opt", "gpt_neox"])
def test_packed_prefill_in_chunks_next_to_decoding_rows_equals_generate(arch):
    """A small prefill budget: prompts are prefilled a few tokens a step, in the same
    forward as the rows decoding; n > 1 copies the prefilled slot; all equal `generate`."""
    tok = make_tokenizer()
    model = _model(arch)
    engine = _engine(model, tok, max_batch_size=64, packed=True, prefill_tokens=3)
    steps = []
    step = engine.batcher.step
    engine.batcher.step = lambda: steps.append([r.pending is None for r in engine.batcher.rows]) or step()
    reqs = _mixed_requests(engine, tok)
    _serve_all(engine, reqs)
    assert any(any(s) and not all(s) for s in steps)  # prefilling and decoding rows in one step
    _assert_each_equals_generate(model, engine, reqs)
    assert not engine.batcher.rows and len(engine.batcher) == 0


def test_packed_serving_and_the_packed_training_pass_coexist_in_one_process():
    """The server's attention function and the training pass's (`attention.PackedPlan`) are
    registered under different names: registering the training one after the engine's
    first step leaves served tokens equal to `generate`."""
    from softprompt.core import attention
    from softprompt.serve import packed as packed_module

    tok = make_tokenizer()
    model = _model("llama")
    engine = _engine(model, tok, packed=True)
    engine.start()
    try:
        first = _request(engine, tok, "good movie", "a", 4)
        engine.scheduler.submit(first)
        assert first.done.wait(30)
        attention._register_packed_attention.cache_clear()
        assert attention._register_packed_attention()
        from transformers import AttentionInterface

        assert AttentionInterface._global_mapping[packed_module.NAME] is packed_module.attention
        reqs = [_request(engine, tok, t, a, 8) for t, a in zip(TEXTS, ["a", "b", None, "c", "a"])]
        for r in reqs:
            engine.scheduler.submit(r)
        for r in reqs:
            assert r.done.wait(30)
        _assert_each_equals_generate(model, engine, [first, *reqs])
    finally:
        engine.stop(5)


def test_batching_is_chosen_once_and_a_stopped_engine_holds_no_kv_slots():
    """`batching.choose`: packed steps where the model passes the probe, padded batches when
    asked (any false value); a stopped engine's packed batcher gives back its KV slots."""
    from softprompt.serve import batching

    tok = make_tokenizer()
    model = _model("llama")
    assert isinstance(_engine(model, tok).batcher, batching.PackedBatcher)
    for off in (False, 0):
        assert isinstance(_engine(model, tok, packed=off).batcher, batching.PaddedBatcher)
    engine = _engine(model, tok, packed=True)
    reqs = _mixed_requests(engine, tok)[:3]
    _serve_all(engine, reqs)
    assert not engine.alive and engine.batcher.slots is None and not engine.batcher.rows
    assert engine.steps > 0 and engine.batcher.seconds > 0
    _assert_each_equals_generate(model, engine, reqs)
