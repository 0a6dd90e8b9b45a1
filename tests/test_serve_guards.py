"""Guards of the server that a mutation audit found untested: the API key on every route,
`/v1/load_adapter` kept inside its roots, replacing an adapter under a served name, stop
strings, streamed usage, and a stream that fails after its first token. One real server
(`softprompt serve --api-key ...`) for the module; the mid-stream fault runs the app
in-process under uvicorn (a fault injected into the model's forward)."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from tests.test_serve import _expected, _ids
from tests.test_serve_support import (
    CHAT_TEMPLATE,
    ServerProcess,
    build_served_folder,
    free_port,
    load_library,
)

TIMEOUT = 60
KEY = "k3y-for-guards"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A served tiny Llama with adapters sst, qa, third (under `adapters`) and the load root
    `extra`; next to it, adapter folders outside every root that a path may try to reach."""
    root = tmp_path_factory.mktemp("guards")
    model_dir, adapters_dir = build_served_folder(root)
    extra = root / "extra"
    extra.mkdir()
    for name, source in (("copy_sst", "sst"), ("copy_qa", "qa"), ("inside", "third")):
        shutil.copytree(adapters_dir / source, extra / name)
    shutil.copytree(adapters_dir / "qa", root / "outside_dotdot")  # reached as extra/../outside_dotdot
    shutil.copytree(adapters_dir / "qa", root / "outside_link")
    os.symlink(root / "outside_link", extra / "link_out", target_is_directory=True)
    shutil.copytree(adapters_dir / "qa", root / "extra_evil")  # a sibling named like the root, plus a suffix
    server = ServerProcess(
        [
            "--model",
            str(model_dir),
            "--adapters",
            str(adapters_dir),
            "--adapter-root",
            str(extra),
            "--allow-adapter-updates",
            "--api-key",
            KEY,
            "--device",
            "cpu",
            "--dtype",
            "float32",
        ],
        root / "server.log",
    )
    try:
        server.wait_ready()
        model, tok = load_library(model_dir, adapters_dir)
        yield {"server": server, "model": model, "tok": tok, "root": root, "extra": extra}
    finally:
        server.stop()


def _post(world, path, body, headers=AUTH):
    return httpx.post(world["server"].url + path, json=body, headers=headers, timeout=TIMEOUT)


def _served(world) -> set[str]:
    r = httpx.get(world["server"].url + "/v1/models", headers=AUTH, timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return {m["id"] for m in r.json()["data"]}


def _load(world, name, path):
    return _post(world, "/v1/load_adapter", {"name": name, "path": str(path)})


# ---------------------------------------------------------------------- 1. the API key
def _request(world, route, headers):
    """A valid request to `route` (one that succeeds with the right key)."""
    url, extra = world["server"].url, world["extra"]
    bodies = {
        "/v1/completions": {"model": "sst", "prompt": "good", "max_tokens": 1},
        "/v1/chat/completions": {
            "model": "sst",
            "messages": [{"role": "user", "content": "good"}],
            "max_tokens": 1,
        },
        "/v1/classify": {"model": "sst", "input": "fun"},
        "/v1/load_adapter": {"name": "keyed", "path": str(extra / "copy_sst")},
        "/v1/unload_adapter": {"name": "victim"},
    }
    if route == "/v1/models":
        return httpx.get(url + route, headers=headers, timeout=TIMEOUT)
    return httpx.post(url + route, json=bodies[route], headers=headers, timeout=TIMEOUT)


ROUTES = [
    "/v1/models",
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/classify",
    "/v1/load_adapter",
    "/v1/unload_adapter",
]
BAD_KEYS = {
    "no-key": {},
    "wrong-key": {"Authorization": "Bearer not-the-key"},
    "key-prefix": {"Authorization": f"Bearer {KEY[:-1]}"},
    "no-scheme": {"Authorization": KEY},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("headers", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_every_v1_route_refuses_a_missing_or_wrong_key(world, route, headers):
    assert _load(world, "victim", world["extra"] / "copy_qa").status_code == 200  # for unload to remove
    r = _request(world, route, headers)
    assert r.status_code == 401, r.text
    assert r.json()["error"]["type"] == "authentication_error"
    served = _served(world)
    assert "keyed" not in served and "victim" in served  # no load, no unload went through


@pytest.mark.parametrize("route", ROUTES)
def test_every_v1_route_lets_the_right_key_through(world, route):
    assert _load(world, "victim", world["extra"] / "copy_qa").status_code == 200
    r = _request(world, route, AUTH)
    assert r.status_code == 200, r.text
    if route == "/v1/load_adapter":
        assert "keyed" in _served(world)
        assert _post(world, "/v1/unload_adapter", {"name": "keyed"}).status_code == 200
    if route == "/v1/unload_adapter":
        assert "victim" not in _served(world)


def test_health_and_metrics_are_open_without_a_key(world):
    # Deliberately open: the key guards the /v1 routes only (ServeConfig.api_key: "on /v1
    # routes"; `_metrics` never calls `_check_key`), so a Prometheus scraper and a load
    # balancer's health check need no key. This pins that choice.
    url = world["server"].url
    assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
    metrics = httpx.get(url + "/metrics", timeout=TIMEOUT)
    assert metrics.status_code == 200 and "softprompt_requests_total" in metrics.text


# ---------------------------------------------------------------------- 2. load_adapter's roots
ESCAPES = {
    "dotdot": lambda extra: f"{extra}/../outside_dotdot",
    "symlink": lambda extra: str(extra / "link_out"),
    "sibling": lambda extra: f"{extra}_evil",
}


@pytest.mark.parametrize("how", list(ESCAPES))
def test_load_adapter_refuses_paths_outside_its_roots(world, how):
    extra = world["extra"]
    path = ESCAPES[how](extra)
    assert (extra.parent / "outside_dotdot" / "adapter_config.json").is_file()  # a real adapter, out there
    assert (extra / "link_out" / "adapter_config.json").is_file()
    assert (extra.parent / "extra_evil" / "adapter_config.json").is_file()
    name = f"escape_{how}"
    r = _post(world, "/v1/load_adapter", {"name": name, "path": path})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["type"] == "permission_error" and r.json()["error"]["param"] == "path"
    assert name not in _served(world)
    gone = _post(world, "/v1/completions", {"model": name, "prompt": "good", "max_tokens": 1})
    assert gone.status_code == 404, gone.text


def test_load_adapter_loads_a_folder_inside_its_root(world):
    r = _load(world, "inside", world["extra"] / "inside")
    assert r.status_code == 200, r.text
    assert "inside" in _served(world)
    ok = _post(world, "/v1/completions", {"model": "inside", "prompt": "good", "max_tokens": 1})
    assert ok.status_code == 200, ok.text


# ---------------------------------------------------------------------- 3. replacing an adapter
def _greedy(world, model, text, max_tokens):
    r = _post(
        world,
        "/v1/completions",
        {
            "model": model,
            "prompt": text,
            "max_tokens": max_tokens,
            "temperature": 0,
            "return_token_ids": True,
        },
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["token_ids"], choice["text"]


def test_loading_under_a_served_name_replaces_the_adapter(world):
    text, n = "fun story", 10
    old = _expected(world, "sst", _ids(world, text), n)
    new = _expected(world, "qa", _ids(world, text), n)
    assert old != new  # the two prompts continue this text differently
    assert _load(world, "swap", world["extra"] / "copy_sst").status_code == 200
    assert _greedy(world, "swap", text, n) == (old, world["tok"].decode(old, skip_special_tokens=True))
    r = _load(world, "swap", world["extra"] / "copy_qa")
    assert r.status_code == 200, r.text
    assert _greedy(world, "swap", text, n) == (new, world["tok"].decode(new, skip_special_tokens=True))


# ---------------------------------------------------------------------- 4. stop strings
def test_a_stop_string_in_the_greedy_continuation_cuts_the_text_before_it(world):
    text, n, stop = "the movie", 12, " hate"
    full = world["tok"].decode(_expected(world, "third", _ids(world, text), n), skip_special_tokens=True)
    assert stop in full and full.index(stop) > 0  # the library's continuation has it, not at the start
    before = full[: full.index(stop)]
    body = {"model": "third", "prompt": text, "max_tokens": n, "temperature": 0}
    plain = _post(world, "/v1/completions", body).json()["choices"][0]
    assert plain["text"] == full and plain["finish_reason"] == "length"
    cut = _post(world, "/v1/completions", {**body, "stop": [stop]})
    assert cut.status_code == 200, cut.text
    choice = cut.json()["choices"][0]
    assert choice["text"] == before and choice["finish_reason"] == "stop"
    chunks = _stream(world, "/v1/completions", {**body, "stop": [stop]})
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == before
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


# ---------------------------------------------------------------------- 5. streamed usage
def _stream(world, path, body):
    """The chunks of a streamed request (asserting the SSE framing and the final [DONE])."""
    url = world["server"].url + path
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=AUTH, timeout=TIMEOUT) as r:
        assert r.status_code == 200, r.read()
        lines = [x for x in r.iter_lines() if x]
    assert lines and all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]", lines
    return [json.loads(x[6:]) for x in lines[:-1]]


USAGE_CASES = {
    "completion": ("/v1/completions", {"model": "qa", "prompt": "fun story", "max_tokens": 8}),
    "completion-2-prompts-n2": (
        "/v1/completions",
        {"model": "third", "prompt": ["good movie", "the plot was very boring and"], "n": 2, "max_tokens": 7},
    ),
    "chat": ("/v1/chat/completions", {"model": "third", "messages": [{"role": "user", "content": "fun"}]}),
}


@pytest.mark.parametrize("case", list(USAGE_CASES))
def test_streamed_usage_equals_the_plain_usage(world, case):
    path, body = USAGE_CASES[case]
    body = {**body, "temperature": 0, "max_tokens": body.get("max_tokens", 6)}
    plain = _post(world, path, body)
    assert plain.status_code == 200, plain.text
    usage = plain.json()["usage"]
    assert (
        usage["completion_tokens"] >= 1
        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    )
    if case == "completion":  # pinned to the library too
        expected = _expected(world, "qa", _ids(world, "fun story"), 8)
        assert usage == {
            "prompt_tokens": len(_ids(world, "fun story")),
            "completion_tokens": len(expected),
            "total_tokens": len(_ids(world, "fun story")) + len(expected),
        }
    chunks = _stream(world, path, {**body, "stream_options": {"include_usage": True}})
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == usage
    assert all(c.get("usage") is None for c in chunks[:-1])


# ---------------------------------------------------------------------- 6. a fault mid-stream
@pytest.fixture(scope="module", params=[None, False], ids=["packed", "padded"])
def inproc(request):
    """The app in this process under uvicorn (a thread), on a tiny base model; yields the
    URL and the `Server`. `packed=None`: packed steps (the tiny Llama passes the check)."""
    import uvicorn

    from softprompt.serve.app import ServeConfig, create_app
    from tests.test_serve_app import _loaded

    def loader():
        model, tok = _loaded()
        tok.chat_template = CHAT_TEMPLATE
        return model, tok

    app = create_app(ServeConfig(base_id="base", packed=request.param, drain_seconds=5), loader)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="guards-uvicorn", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            assert thread.is_alive(), "uvicorn stopped"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the in-process server was not ready"
            time.sleep(0.1)
        yield url, app.state.server
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_a_stream_failing_after_its_first_token_ends_with_an_error_then_done(inproc, kind):
    url, server = inproc
    base = server.engine.model.base_model
    forward = base.forward
    calls = []

    def failing(*args, **kwargs):  # the prefill (and first token) passes; the next step raises
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("injected fault after the first token")
        return forward(*args, **kwargs)

    if kind == "completion":
        path, body = "/v1/completions", {"model": "base", "prompt": "the movie"}
    else:
        path, body = (
            "/v1/chat/completions",
            {"model": "base", "messages": [{"role": "user", "content": "fun"}]},
        )
    body = {**body, "max_tokens": 20, "temperature": 0, "stream": True, "return_token_ids": True}
    base.forward = failing
    try:
        with httpx.stream("POST", url + path, json=body, timeout=TIMEOUT) as r:
            assert r.status_code == 200
            lines = [x for x in r.iter_lines() if x]
    finally:
        base.forward = forward
    assert len(calls) == 2, "the fault did not fire on the step after the first token"
    assert all(x.startswith("data: ") for x in lines), lines
    assert lines[-1] == "data: [DONE]", lines
    events = [json.loads(x[6:]) for x in lines[:-1]]
    assert "error" in events[-1], events
    assert (
        events[-1]["error"]["type"] == "server_error" and "injected fault" in events[-1]["error"]["message"]
    )
    normal = events[:-1]
    assert normal and all("error" not in e and "choices" in e for e in normal), events
    tokens = [t for e in normal for c in e["choices"] for t in c.get("token_ids") or []]
    assert len(tokens) == 1  # exactly the first token was streamed before the fault
    after = httpx.post(url + path, json={**body, "stream": False, "max_tokens": 2}, timeout=TIMEOUT)
    assert after.status_code == 200, after.text  # the fault failed that request only
