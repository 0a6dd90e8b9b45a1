"""Guards for the server's prompt-KV cache: which prompt the budget evicts (the least recently
used one, not the oldest inserted or the newest), in `PromptKV` and through the engine, and
`softprompt serve --prompt-cache-mb` reaching the engine's budget.

The adapters here all have the same number of virtual tokens, so every cached prompt takes
the same bytes and a budget of 2.5 prompts holds exactly two: which one goes is decided by
the eviction order alone, never by sizes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("prometheus_client")

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.core.prefix import PromptKV
from softprompt.serve.engine import PLACEHOLDER, Engine
from softprompt.serve.scheduler import Scheduler
from tests.test_serve_engine import MODES, _expected, _matches, _request
from tests.tiny import build_model, make_tokenizer, save_model

NAMES = ("p", "q", "r", "s")
TOKENS = 3  # virtual tokens of every adapter: equal sizes in the cache


def _model() -> SoftPromptModel:
    torch.manual_seed(0)
    model = SoftPromptModel(
        build_model("CAUSAL_LM", "llama"),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1),
        PLACEHOLDER,
        trainable=False,
    )
    for name in NAMES:
        model.add_adapter(
            name, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=TOKENS), trainable=False
        )
        with torch.no_grad():
            model.prompts[name].embedding.normal_(0, 2.0)
    return model.eval()


def _one_prompt_bytes(model: SoftPromptModel) -> int:
    """Bytes one adapter's prompt KV takes in the cache (the engine's way: float32, no logits)."""
    probe = PromptKV()
    with torch.no_grad():
        probe.get(model, NAMES[0], torch.float32, False)
        size = probe.nbytes
        probe.get(model, NAMES[1], torch.float32, False)
    assert size > 0 and probe.nbytes == 2 * size  # the same size for every adapter
    return size


def _cached(store: PromptKV) -> set[str]:
    return {n for n in NAMES if n in store}


# The uses and what the least-recently-used rule keeps after each (budget: two prompts). After
# "p q p" the order of last use is q, p: "r" must evict q. Evicting the oldest inserted (FIFO:
# a hit not refreshing its entry) would evict p, evicting the most recently used would evict p,
# and dropping the newcomer would keep p, q. Then p is used again (order r, p), so q evicts r;
# then s evicts p (order p, q).
USES = [
    ("p", {"p"}),
    ("q", {"p", "q"}),
    ("p", {"p", "q"}),  # a hit: p becomes the most recently used
    ("r", {"p", "r"}),  # evicts q, the least recently used (not p, the oldest inserted)
    ("p", {"p", "r"}),  # a hit
    ("q", {"p", "q"}),  # evicts r
    ("s", {"q", "s"}),  # evicts p
]
HITS, MISSES, EVICTIONS = 2, 5, 3


def test_prompt_kv_evicts_the_least_recently_used_prompt_not_the_oldest_or_the_newest():
    model = _model()
    size = _one_prompt_bytes(model)
    store = PromptKV(budget_bytes=2 * size + size // 2)  # exactly two prompts fit
    with torch.no_grad():
        for i, (name, kept) in enumerate(USES):
            store.get(model, name, torch.float32, False)
            assert _cached(store) == kept, (i, name, _cached(store), kept)
            assert store.nbytes == size * len(kept)
    assert (store.hits, store.misses, store.evictions) == (HITS, MISSES, EVICTIONS)
    assert len(store) == 2


@MODES
def test_engine_prompt_cache_keeps_the_least_recently_used_order_and_counts(packed):
    """The same uses as requests through the running engine (one request after the other, so
    each uses the cache once), with the budget given as `prompt_cache_mb`; every answer is
    still greedy `generate`, recomputed prompts included."""
    tok = make_tokenizer()
    model, reference = _model(), _model()  # (generate on the served model would use its cache)
    size = _one_prompt_bytes(model)
    budget = 2 * size + size // 2
    engine = Engine(
        model,
        tok,
        Scheduler(max_batch_size=8, max_queue=16),
        base_id="base",
        prompt_cache_mb=budget / 2**20,  # (a power of two: the bytes come back exactly)
        packed=packed,
    )
    assert engine.packed == packed
    for name in NAMES:  # serve the model's own adapters under their names
        engine.registry.adopt(name, name)
    store = model.prompt_kv
    assert store.budget_bytes == budget and len(store) == 0
    engine.start()
    try:
        for i, (name, kept) in enumerate(USES):
            req = _request(engine, tok, "good movie", name, 3)
            engine.scheduler.submit(req)
            assert req.done.wait(30) and req.error is None, (i, name, req.error)
            want = _expected(reference, req)
            assert _matches(req.choices[0].tokens, want, engine.stop_token_ids), (i, name)
            assert _cached(store) == kept, (i, name, _cached(store), kept)
    finally:
        engine.stop(5)
    assert (store.hits, store.misses, store.evictions) == (HITS, MISSES, EVICTIONS)
    assert store.nbytes == 2 * size <= store.budget_bytes


def test_prompt_cache_mb_on_the_command_line_sets_the_engines_budget(tmp_path, monkeypatch):
    """`softprompt serve` parsed and run by the real CLI code (`build_parser`, the `serve`
    command's function) up to `uvicorn.run`, which is replaced by a stand-in that keeps the
    app; the app's start-up (loading the model, building the engine) is then run by hand."""
    import uvicorn

    from softprompt.cli import build_parser

    model_dir = save_model(tmp_path / "model")
    apps = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: apps.append(app))
    base = ["serve", "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--port", "1"]
    # 0.75 MB: 786432 bytes; not the default (unbounded) and not a round number of bytes per MB
    for extra, want in ((["--prompt-cache-mb", "0.75"], 786432), ([], None)):
        args = build_parser().parse_args(base + extra)
        assert args.func(args) == 0
        server = apps.pop().state.server
        assert server.config.prompt_cache_mb == (0.75 if extra else None)
        server.load()
        try:
            assert server.state == "ready", server.error
            assert server.engine.model.prompt_kv.budget_bytes == want
        finally:
            if server.engine is not None:
                server.engine.stop(5)
