"""A real `softprompt serve` (uvicorn subprocess, tiny local Llama, three adapters) talked to
with the official `openai` client and raw httpx: results equal the library's, bad requests
get the OpenAI error envelope with a 4xx, faults stay contained."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt.scoring.classify import classify_texts
from tests.test_serve_support import (
    LABEL_WORDS,
    TEMPLATE,
    ServerProcess,
    build_served_folder,
    load_library,
)

TIMEOUT = 60


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters_dir = build_served_folder(root)
    extra = root / "extra"
    extra.mkdir()
    server = ServerProcess(
        [
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters_dir),
            "--adapter-root",
            str(extra),
            "--allow-adapter-updates",
            "--max-batch-size",
            "16",
            "--max-body-mb",
            "0.05",
        ],
        root / "server.log",
    )
    try:
        server.wait_ready()
        model, tok = load_library(model_dir, adapters_dir)
        yield {
            "server": server,
            "model": model,
            "tok": tok,
            "adapters": adapters_dir,
            "extra": extra,
            "model_dir": model_dir,
        }
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(world):
    return openai.OpenAI(
        base_url=world["server"].url + "/v1", api_key="unused", timeout=TIMEOUT, max_retries=0
    )


def _expected(world, adapter, ids, max_tokens):
    model = world["model"]
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            adapter_names=[adapter or "__base__"],
            max_new_tokens=max_tokens,
            do_sample=False,
        )
    new = out[0, len(ids) :].tolist()
    eos = model.base_model.generation_config.eos_token_id
    cut = next((i + 1 for i, t in enumerate(new) if t == eos), len(new))
    return new[:cut]


def _ids(world, text):
    return world["tok"](text, add_special_tokens=False)["input_ids"]


def _base(world):
    return str(world["model_dir"])


def _good(world):
    r = httpx.post(
        world["server"].url + "/v1/completions",
        json={"model": "sst", "prompt": "good", "max_tokens": 1},
        timeout=TIMEOUT,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_health_and_models(world, client):
    assert httpx.get(world["server"].url + "/health", timeout=10).status_code == 200
    models = {m.id: m for m in client.models.list().data}
    assert set(models) >= {_base(world), "sst", "qa", "third"}
    assert models["sst"].parent == _base(world) and models["sst"].owned_by == "softprompt"
    assert models[_base(world)].parent is None and models["sst"].object == "model"


@pytest.mark.parametrize("adapter", ["sst", "qa", None])
def test_greedy_completion_equals_library_generate(world, client, adapter):
    text = "the plot was very boring and"
    r = client.completions.create(
        model=adapter or _base(world),
        prompt=text,
        max_tokens=20,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    expected = _expected(world, adapter, _ids(world, text), 20)
    choice = r.choices[0]
    assert choice.token_ids == expected
    assert choice.text == world["tok"].decode(expected, skip_special_tokens=True)
    assert r.usage.prompt_tokens == len(_ids(world, text)) and r.usage.completion_tokens == len(expected)
    assert r.object == "text_completion" and r.model == (adapter or _base(world))


def test_chat_uses_the_chat_template_and_equals_generate(world, client):
    messages = [{"role": "user", "content": "good movie"}]
    r = client.chat.completions.create(
        model="qa", messages=messages, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
    )
    tok = world["tok"]
    ids = _ids(world, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    expected = _expected(world, "qa", ids, 12)
    assert r.choices[0].token_ids == expected
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)


def test_concurrent_adapters_joining_mid_decode_equal_generate(world):
    texts = ["good movie", "the plot was very boring", "love it", "awful acting so bad", "fun story", "music"]
    jobs = [
        (t, ["sst", "qa", "third", None][i % 4], 6 + 5 * (i % 4), i % 3 == 0) for i, t in enumerate(texts * 2)
    ]

    async def run():
        client = openai.AsyncOpenAI(
            base_url=world["server"].url + "/v1", api_key="x", timeout=TIMEOUT, max_retries=0
        )

        async def one(i, text, adapter, max_tokens, stream):
            await asyncio.sleep(0.01 * i)  # arrivals spread over the decoding of earlier ones
            kw = {
                "model": adapter or _base(world),
                "prompt": text,
                "max_tokens": max_tokens,
                "temperature": 0,
                "extra_body": {"return_token_ids": True},
            }
            if not stream:
                r = await client.completions.create(**kw)
                return r.choices[0].token_ids
            tokens = []
            async for chunk in await client.completions.create(stream=True, **kw):
                for c in chunk.choices:
                    tokens += getattr(c, "token_ids", None) or []
            return tokens

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i, *j) for i, j in enumerate(jobs))), TIMEOUT)
        finally:
            await client.close()

    results = asyncio.run(run())
    for (text, adapter, max_tokens, _), got in zip(jobs, results):
        assert got == _expected(world, adapter, _ids(world, text), max_tokens), (text, adapter)


def test_streaming_sse_format_and_usage(world, client):
    body = {
        "model": "sst",
        "prompt": "good movie",
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with httpx.stream("POST", world["server"].url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in r.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    plain = client.completions.create(model="sst", prompt="good movie", max_tokens=8, temperature=0)
    assert text == plain.choices[0].text
    assert chunks[-2]["choices"][0]["finish_reason"] == plain.choices[0].finish_reason
    stream = client.chat.completions.create(
        model="qa", messages=[{"role": "user", "content": "fun"}], max_tokens=5, temperature=0, stream=True
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert parts[-1].choices[0].finish_reason in ("length", "stop")


def test_seeded_sampling_reproduces(world, client):
    def run(seed):
        r = client.completions.create(
            model="third",
            prompt="good movie",
            max_tokens=10,
            temperature=1.0,
            n=2,
            seed=seed,
            extra_body={"return_token_ids": True},
        )
        return [c.token_ids for c in sorted(r.choices, key=lambda c: c.index)]

    first = run(3)
    assert first == run(3)
    assert first != run(4)


def test_logprobs_and_stop(world, client):
    r = client.completions.create(model="sst", prompt="good movie", max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert all(len(t) <= 3 and v <= 0 for t, v in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(
        model="sst",
        messages=[{"role": "user", "content": "good"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)  # greedy: the top one
    full = (
        client.completions.create(model="qa", prompt="the movie", max_tokens=12, temperature=0)
        .choices[0]
        .text
    )
    words = full.split()
    if len(words) >= 3:
        stop = " " + words[2]
        cut = client.completions.create(
            model="qa", prompt="the movie", max_tokens=12, temperature=0, stop=[stop]
        )
        assert cut.choices[0].text == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_classify_equals_library(world):
    texts = ["good movie", "awful acting so bad", "fun"]
    r = httpx.post(
        world["server"].url + "/v1/classify", json={"model": "sst", "input": texts}, timeout=TIMEOUT
    )
    assert r.status_code == 200, r.text
    expected = classify_texts(
        world["model"],
        world["tok"],
        texts,
        adapter="sst",
        template=TEMPLATE,
        label_words=LABEL_WORDS,
        max_length=64,
    )
    for got, exp in zip(r.json()["data"], expected):
        assert got["label"] == exp["label"]
        assert got["probs"] == pytest.approx(exp["probs"], abs=1e-6)
    one = httpx.post(
        world["server"].url + "/v1/classify", json={"model": "sst", "input": "fun"}, timeout=TIMEOUT
    )
    assert one.json()["data"][0]["label"] == expected[2]["label"]
    no_settings = httpx.post(
        world["server"].url + "/v1/classify", json={"model": "qa", "input": "x"}, timeout=TIMEOUT
    )
    assert no_settings.status_code == 400 and "label_words" in no_settings.json()["error"]["message"]


BAD = [
    (b"{bad json", 400),
    (b"\xff\xfe{}", 400),  # invalid UTF-8
    (b"[1, 2]", 400),
    (b'{"model": "sst", "prompt": "x", "max_tokens": NaN}', 400),
    (json.dumps({"model": "sst"}).encode(), 400),  # no prompt
    (json.dumps({"model": "sst", "prompt": 5}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "max_tokens": "5"}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "max_tokens": True}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "temperature": -1}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "stop": [1]}).encode(), 400),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": "../etc", "prompt": "x"}).encode(), 404),
    (json.dumps({"model": "sst", "prompt": ""}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": []}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": [1, 99999]}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "good " * 200}).encode(), 400),  # over-long input
    (json.dumps({"model": "sst", "prompt": "x", "max_tokens": 100000}).encode(), 400),  # beyond the context
    (json.dumps({"model": "sst", "prompt": "x", "n": 10**9}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "n": 17}).encode(), 400),  # more than the batch size
    (json.dumps({"model": "sst", "prompt": "x", "logprobs": 500}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "x", "echo": True}).encode(), 400),
    (json.dumps({"model": "sst", "prompt": "good " * 20000}).encode(), 413),  # oversized body
]


@pytest.mark.parametrize(("body", "status"), BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_completion_requests_get_the_error_envelope(world, body, status):
    r = httpx.post(
        world["server"].url + "/v1/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=TIMEOUT,
    )
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    _good(world)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "sst", "messages": []}, 400),
        ("/v1/chat/completions", {"model": "sst", "messages": [{"role": "wizard", "content": "x"}]}, 400),
        ("/v1/chat/completions", {"model": "sst", "messages": "hi"}, 400),
        ("/v1/classify", {"model": "sst", "input": []}, 400),
        ("/v1/classify", {"model": "sst", "input": [1]}, 400),
        ("/v1/load_adapter", {"name": "x", "path": "/etc"}, 403),
        ("/v1/unload_adapter", {"name": "never-loaded"}, 404),
        ("/v1/nowhere", {}, 404),
    ],
)
def test_bad_requests_on_other_routes(world, path, body, status):
    r = httpx.post(world["server"].url + path, json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    _good(world)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-2, 120), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)
_fields = [
    "model",
    "prompt",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "stream",
    "stream_options",
    "echo",
    "input",
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/classify"]),
    body=st.fixed_dictionaries(
        {"model": st.sampled_from(["sst", "qa", "nope", ""])},
        optional={f: _values for f in _fields if f != "model"},
    ),
)
def test_fuzzed_bodies_never_break_the_server(world, path, body):
    if isinstance(body.get("max_tokens"), int) and body.get("n", 1) not in (None,):
        body["max_tokens"] = min(body["max_tokens"], 8)
    body.setdefault("max_tokens", 4) if path != "/v1/classify" else None
    r = httpx.post(world["server"].url + path, json=body, timeout=TIMEOUT)
    assert r.status_code < 500, (body, r.text)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def _wait_for_gauge(url: str, name: str, value: float) -> None:
    """Poll /metrics until the unlabelled gauge `name` reads `value` (at most TIMEOUT s)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
        if f"{name} {float(value)}" in lines:
            return
        assert time.monotonic() < deadline, f"{name} never read {value}"
        time.sleep(0.01)


def _metric(world, name, model):
    text = httpx.get(world["server"].url + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and f'model="{model}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_dropping_mid_stream_frees_its_slot(world):
    before = _metric(world, "softprompt_failed_requests_total", "third")
    body = {"model": "third", "prompt": "good movie", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.stream("POST", world["server"].url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first token
    deadline = time.monotonic() + 20
    while _metric(world, "softprompt_failed_requests_total", "third") <= before:
        assert time.monotonic() < deadline, "the dropped request was never cancelled"
        time.sleep(0.1)
    _good(world)


def test_metrics_are_labelled_per_adapter(world, client):
    client.completions.create(model="qa", prompt="fun", max_tokens=2, temperature=0)
    text = httpx.get(world["server"].url + "/metrics", timeout=10).text
    for name in (
        "softprompt_requests_total",
        "softprompt_generation_tokens_total",
        "softprompt_time_to_first_token_seconds_bucket",
        "softprompt_request_latency_seconds_bucket",
        "softprompt_queue_depth",
        "softprompt_batch_size_bucket",
    ):
        assert name in text
    assert _metric(world, "softprompt_generation_tokens_total", "qa") >= 2


def test_load_replace_unload_adapters_at_run_time(world, client):
    url = world["server"].url
    folder = world["extra"] / "copy_of_sst"
    shutil.copytree(world["adapters"] / "sst", folder)
    r = httpx.post(url + "/v1/load_adapter", json={"name": "fresh", "path": str(folder)}, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    same = [
        client.completions.create(model=m, prompt="good movie", max_tokens=6, temperature=0).choices[0].text
        for m in ("fresh", "sst")
    ]
    assert same[0] == same[1]
    broken = world["extra"] / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    r = httpx.post(url + "/v1/load_adapter", json={"name": "broken", "path": str(broken)}, timeout=TIMEOUT)
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    outside = httpx.post(
        url + "/v1/load_adapter", json={"name": "o", "path": str(world["model_dir"])}, timeout=10
    )
    assert outside.status_code == 403
    assert httpx.post(url + "/v1/unload_adapter", json={"name": "fresh"}, timeout=TIMEOUT).status_code == 200
    gone = httpx.post(url + "/v1/completions", json={"model": "fresh", "prompt": "x"}, timeout=TIMEOUT)
    assert gone.status_code == 404
    _good(world)


def test_an_adapter_of_another_base_model_is_refused_at_load_and_just_in_time(world):
    from softprompt import PromptTuningConfig, SoftPromptModel
    from tests.tiny import build_model

    url = world["server"].url
    other = SoftPromptModel(  # the served base is seed 1: same architecture and width, other weights
        build_model("CAUSAL_LM", "llama", seed=2),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
        "x",
    )
    other.save_pretrained(world["extra"] / "alien")
    r = httpx.post(
        url + "/v1/load_adapter",
        json={"name": "alien", "path": str(world["extra"] / "alien")},
        timeout=TIMEOUT,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "base_model_mismatch" and error["param"] == "path"
    assert "was saved from base model" in error["message"] and "--allow-base-mismatch" in error["message"]
    jit = world["adapters"] / "alien_jit"
    other.save_pretrained(jit)
    try:
        r = httpx.post(url + "/v1/completions", json={"model": "alien_jit", "prompt": "x"}, timeout=TIMEOUT)
        assert r.status_code == 400 and r.json()["error"]["code"] == "base_model_mismatch", r.text
    finally:
        shutil.rmtree(jit)
    _good(world)


def test_unloading_an_adapter_while_it_streams(world):
    url = world["server"].url
    folder = world["extra"] / "copy_of_qa"
    shutil.copytree(world["adapters"] / "qa", folder)
    assert (
        httpx.post(
            url + "/v1/load_adapter", json={"name": "temp", "path": str(folder)}, timeout=30
        ).status_code
        == 200
    )
    body = {
        "model": "temp",
        "prompt": "good movie",
        "max_tokens": 60,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    tokens, unloaded = [], False
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                tokens += chunk["choices"][0].get("token_ids") or []
                if not unloaded:
                    u = httpx.post(url + "/v1/unload_adapter", json={"name": "temp"}, timeout=TIMEOUT)
                    assert u.status_code == 200
                    unloaded = True
    assert tokens == _expected(world, "qa", _ids(world, "good movie"), 60)


def test_adapter_folder_added_later_is_served_just_in_time(world, client):
    shutil.copytree(world["adapters"] / "qa", world["adapters"] / "late")
    got = client.completions.create(model="late", prompt="fun story", max_tokens=8, temperature=0)
    ref = client.completions.create(model="qa", prompt="fun story", max_tokens=8, temperature=0)
    assert got.choices[0].text == ref.choices[0].text
    assert "late" in {m.id for m in client.models.list().data}


# ---------------------------------------------------------------------- a small, locked server
def test_api_key_queue_limit_and_shutdown_with_requests_in_flight(tmp_path):
    """Also: padded batches (--padded-batches), bfloat16 weights (--dtype; greedy tokens equal
    the library's on the bfloat16 model), and a broken adapter folder under --adapters is
    skipped with a message while the others are served."""
    model_dir, adapters_dir = build_served_folder(tmp_path)
    # room for a request that decodes for seconds (Llama's rotary positions: no weights change)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    (adapters_dir / "broken").mkdir()
    (adapters_dir / "broken" / "adapter_config.json").write_text("{not json", encoding="utf-8")
    server = ServerProcess(
        [
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters_dir),
            "--padded-batches",
            "--device",
            "cpu",
            "--dtype",
            "bfloat16",
            "--api-key",
            "s3cret",
            "--max-batch-size",
            "1",
            "--max-queue",
            "1",
            "--drain-seconds",
            "20",
        ],
        tmp_path / "server.log",
    )
    try:
        server.wait_ready()
        url = server.url
        body = {"model": "sst", "prompt": "good", "max_tokens": 1}
        assert httpx.post(url + "/v1/completions", json=body, timeout=10).status_code == 401
        wrong = httpx.post(
            url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=10
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert client.completions.create(model="sst", prompt="good", max_tokens=2).choices
        assert {m.id for m in client.models.list().data} >= {"sst", "qa", "third"}
        assert "not serving broken" in server.output() and "padded batches" in server.output()
        assert "on cpu in bfloat16" in server.output()
        model, tok = load_library(model_dir, adapters_dir, dtype=torch.bfloat16)
        ids = tok("good movie", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                adapter_names=["qa"], max_new_tokens=6, do_sample=False,
            )  # fmt: skip
        served = client.completions.create(model="qa", prompt="good movie", max_tokens=6, temperature=0)
        eos = model.base_model.generation_config.eos_token_id
        new = out[0, len(ids) :].tolist()
        new = new[: next((i for i, t in enumerate(new) if t == eos), len(new))]
        assert served.choices[0].text == tok.decode(new, skip_special_tokens=True)

        # The queue limit, for certain: a long request decodes (the batch holds one row), a
        # second waits (the queue holds one), so a third is refused at once. The long one (qa
        # greedy on "fun" meets no EOS; 4000 tokens take seconds) only ends when its client
        # leaves; then the waiting one is served.
        auth = {"Authorization": "Bearer s3cret"}
        short = {"model": "qa", "prompt": "good movie", "max_tokens": 6, "temperature": 0}
        endless = {"model": "qa", "prompt": "fun", "max_tokens": 4000, "temperature": 0, "stream": True}
        completions = url + "/v1/completions"
        with ThreadPoolExecutor(1) as pool:
            with httpx.stream("POST", completions, json=endless, headers=auth, timeout=TIMEOUT) as running:
                assert running.status_code == 200
                lines = running.iter_lines()  # kept open: dropping it would close the connection
                assert next(x for x in lines if x.startswith("data: {"))  # under way
                waiting = pool.submit(httpx.post, completions, json=short, headers=auth, timeout=TIMEOUT)
                _wait_for_gauge(url, "softprompt_queue_depth", 1)
                limited = httpx.post(completions, json=short, headers=auth, timeout=TIMEOUT)
                assert limited.status_code == 429, limited.text
                assert int(limited.headers["retry-after"]) >= 1
                assert limited.json()["error"]["type"] == "rate_limit_error"
                assert not waiting.done()  # still queued behind the long one
            served_later = waiting.result(TIMEOUT)  # the client left: the long one was cancelled
        assert served_later.status_code == 200, served_later.text
        assert served_later.json()["choices"][0]["text"] == served.choices[0].text

        # shutdown while a request streams: it finishes (or ends with a clean error), the process exits
        lines = []
        long = {"model": "qa", "prompt": "good movie", "max_tokens": 100, "temperature": 0, "stream": True}
        auth = {"Authorization": "Bearer s3cret"}
        with httpx.stream("POST", url + "/v1/completions", json=long, headers=auth, timeout=TIMEOUT) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and not lines:
                    server.proc.send_signal(__import__("signal").SIGTERM)
                lines.append(line)
        data = [x for x in lines if x.startswith("data: ")]
        assert data[-1] == "data: [DONE]"
        last = json.loads(data[-2][6:])
        assert "error" in last or last["choices"][0]["finish_reason"] in ("length", "stop")
        # uvicorn shuts down cleanly, then re-raises the SIGTERM it caught (exit status -15)
        assert server.proc.wait(30) in (0, -15)
        assert "Finished server process" in server.output()
    finally:
        server.stop()


def test_a_bad_device_or_dtype_stops_serve_at_once():
    import subprocess
    import sys

    for flag, value in (("--dtype", "float8"), ("--device", "tpu")):
        done = subprocess.run(
            [sys.executable, "-m", "softprompt", "serve", flag, value, "--port", "1"],
            check=False, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode != 0 and repr(value) in done.stderr, done.stderr[-500:]
