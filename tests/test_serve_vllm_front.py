"""The vLLM engine's front against a stand-in vLLM (a real HTTP server in a thread): what it
sends (prompt embeddings exactly `[prompt; token embeddings]`), how it reads the stream, and
how it fails (503 down, 504 slow, 502 broken, recovery). tests/test_serve_vllm.py runs the
real vLLM."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
import torch

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.serve.app import ServeConfig, create_app
from softprompt.serve.engine import PLACEHOLDER
from softprompt.serve.vllm_engine import VllmSettings, embeddings_only_model, encode_embeds
from tests.fake_vllm import FakeVllm
from tests.test_serve_support import free_port
from tests.tiny import build_model, make_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("front-model")
    torch.manual_seed(0)
    build_model("CAUSAL_LM", "llama").save_pretrained(root)
    make_tokenizer().save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def adapters(model_dir, tmp_path_factory):
    """Two adapters of the tiny model (3 and 5 virtual tokens), the first with a run_config.json."""
    from softprompt.base_models import load_model

    root = tmp_path_factory.mktemp("front-adapters")
    base, _ = load_model(str(model_dir))
    for name, n in (("alpha", 3), ("beta", 5)):
        torch.manual_seed(n)
        model = SoftPromptModel(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n), name)
        model.save_pretrained(root / name, selected_adapters=[name])
    resolved = {"task": "classification", "template": "Review: {text}\nSentiment:",
                "label_words": {"negative": " bad", "positive": " good"}}  # fmt: skip
    (root / "alpha" / "run_config.json").write_text(json.dumps({"config": {}, "resolved": resolved}))
    return root


def _front(model_dir, adapters, url, timeout=2.0):
    def loader():
        base, tok = embeddings_only_model(str(model_dir))
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1)
        return SoftPromptModel(base, config, PLACEHOLDER, trainable=False).eval(), tok

    config = ServeConfig(
        model=str(model_dir),
        base_id="base",
        adapters_dirs=[str(adapters)],
        engine="vllm",
        vllm=VllmSettings(url=url, timeout_s=timeout, connect_timeout_s=1.0),
    )
    return TestClient(create_app(config, loader=loader))


def _ready(client):
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if client.get("/health").status_code == 200:
            return
        time.sleep(0.05)
    raise TimeoutError(client.get("/health").text)


def _decode(b64: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(b64)), weights_only=True)


def test_the_front_holds_only_the_input_embeddings(model_dir):
    from softprompt.base_models import load_model

    base, _ = embeddings_only_model(str(model_dir))
    full, _ = load_model(str(model_dir))
    real = [n for n, p in base.named_parameters() if p.device.type != "meta"]
    assert real == ["model.embed_tokens.weight"]
    assert torch.equal(base.get_input_embeddings().weight, full.get_input_embeddings().weight)


def test_requests_become_prompt_embeddings_and_the_stream_becomes_choices(model_dir, adapters):
    from softprompt.base_models import load_model

    fake = FakeVllm()
    try:
        with _front(model_dir, adapters, fake.url) as client:
            _ready(client)
            prompt = [5, 6, 11, 12]
            r = client.post("/v1/completions", json={"model": "beta", "prompt": prompt, "max_tokens": 3,
                                                     "temperature": 0, "logprobs": 1})  # fmt: skip
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["finish_reason"] == "length" and choice["logprobs"]["token_logprobs"] == [-0.25] * 3
            body = fake.bodies[-1]
            assert body["model"] == "m" and body["stream"] and body["max_tokens"] == 3 and body["n"] == 1
            assert body["temperature"] == 0 and body["return_token_ids"]
            sent = _decode(body["prompt_embeds"])
            base, _ = load_model(str(model_dir))
            library = SoftPromptModel.from_pretrained(base, adapters / "beta", adapter_name="beta")
            expected = torch.cat(
                [library.prompts["beta"](torch.float32), base.get_input_embeddings().weight[prompt]]
            )
            assert sent.dtype == torch.float32 and torch.equal(sent, expected)
            # the bare model: the token embeddings alone; greedy n=2 is asked once, given to both
            r = client.post("/v1/completions", json={"model": "base", "prompt": prompt, "max_tokens": 2,
                                                     "temperature": 0, "n": 2})  # fmt: skip
            assert r.status_code == 200, r.text
            assert torch.equal(
                _decode(fake.bodies[-1]["prompt_embeds"]), base.get_input_embeddings().weight[prompt]
            )
            assert fake.bodies[-1]["n"] == 1 and [c["index"] for c in r.json()["choices"]] == [0, 1]
            assert r.json()["choices"][0]["text"] == r.json()["choices"][1]["text"]
            # sampling n=2 with a seed: vLLM's own n and seed
            ask = {
                "model": "alpha",
                "prompt": "good movie",
                "max_tokens": 2,
                "temperature": 0.8,
                "n": 2,
                "seed": 5,
            }
            r = client.post("/v1/completions", json=ask)
            assert r.status_code == 200, r.text
            assert fake.bodies[-1]["n"] == 2 and fake.bodies[-1]["seed"] == 5
            texts = [c["text"] for c in r.json()["choices"]]
            assert texts[0] != texts[1]  # each choice got its own tokens (7, 8 and 8, 9)
            # streamed
            ask = {"model": "alpha", "prompt": "good", "max_tokens": 4, "temperature": 0, "stream": True}
            with client.stream("POST", "/v1/completions", json=ask) as s:
                events = [line for line in s.iter_lines() if line.startswith("data:")]
            assert events[-1] == "data: [DONE]" and len(events) >= 3
    finally:
        fake.close()


def test_classify_sums_the_label_tokens_log_probabilities(model_dir, adapters):
    fake = FakeVllm()
    try:
        with _front(model_dir, adapters, fake.url) as client:
            _ready(client)
            r = client.post("/v1/classify", json={"model": "alpha", "input": ["good movie", "bad plot"]})
            assert r.status_code == 200, r.text
            tok = make_tokenizer()
            bad, good = (tok(w, add_special_tokens=False)["input_ids"] for w in (" bad", " good"))
            assert len(bad) == 1 and len(good) == 1
            assert sorted(fake.bodies[-1]["logprob_token_ids"]) == sorted([bad[0], good[0]])
            expected = torch.softmax(
                torch.tensor([-0.5 - bad[0] / 100, -0.5 - good[0] / 100], dtype=torch.float64), 0
            )
            for row in r.json()["data"]:
                assert row["probs"]["negative"] == pytest.approx(float(expected[0]), abs=1e-12)
                assert row["probs"]["positive"] == pytest.approx(float(expected[1]), abs=1e-12)
    finally:
        fake.close()


def test_vllm_down_slow_or_broken_gives_503_504_502_and_the_front_recovers(model_dir, adapters):
    port = free_port()
    with _front(model_dir, adapters, f"http://127.0.0.1:{port}/v1", timeout=1.0) as client:
        _ready(client)
        ask = {"model": "alpha", "prompt": "good movie", "max_tokens": 2, "temperature": 0}
        r = client.post("/v1/completions", json=ask)
        assert r.status_code == 503 and "not reachable" in r.json()["error"]["message"], r.text
        fake = FakeVllm(port)  # vLLM comes back: the next request goes through
        try:
            assert client.post("/v1/completions", json=ask).status_code == 200
            fake.mode = "hang"
            t0 = time.monotonic()
            r = client.post("/v1/completions", json=ask)
            assert r.status_code == 504 and time.monotonic() - t0 < 10, r.text
            assert "sent nothing for 1 s" in r.json()["error"]["message"]
            fake.mode = "fail"
            r = client.post("/v1/completions", json=ask)
            assert r.status_code == 502 and "engine core died" in r.json()["error"]["message"], r.text
            fake.mode = "refuse"
            r = client.post("/v1/completions", json=ask)
            assert r.status_code == 400 and "prompt too long" in r.json()["error"]["message"], r.text
            fake.mode = "ok"
            assert client.post("/v1/completions", json=ask).status_code == 200
        finally:
            fake.close()


def test_encode_embeds_round_trips_through_torch_load():
    t = torch.randn(4, 6)
    assert torch.equal(_decode(encode_embeds(t)), t)


def test_prompt_embedder_builds_the_rows_the_library_feeds_the_model(model_dir, adapters):
    from softprompt.base_models import load_model
    from softprompt.serve.prompt_embeds import PromptEmbedder

    embedder = PromptEmbedder(model_dir, {"beta": adapters / "beta"})
    base, tok = load_model(str(model_dir))
    library = SoftPromptModel.from_pretrained(base, adapters / "beta", adapter_name="beta")
    table = base.get_input_embeddings().weight
    ids = tok("good movie", add_special_tokens=False)["input_ids"]
    rows, bare = embedder.embeds("beta", ["good movie", ids]), embedder.embeds(None, ["good movie"])
    expected = torch.cat([library.prompts["beta"](torch.float32), table[ids]])
    assert torch.equal(rows[0], expected) and torch.equal(rows[1], expected)
    assert torch.equal(bare[0], table[ids])
    assert embedder.vllm_inputs("beta", [ids])[0]["prompt_embeds"].shape == expected.shape
    with pytest.raises(ValueError, match="no adapter 'gamma'"):
        embedder.embeds("gamma", ["good"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--engine", "vllm"], "needs either --vllm-url"),
        (["--engine", "vllm", "--vllm-url", "http://a/v1", "--vllm-python", "p"], "needs either --vllm-url"),
        (["--vllm-url", "http://127.0.0.1:1/v1"], "go with --engine vllm"),
        (["--engine", "vllm", "--vllm-url", "127.0.0.1:8001"], "must start with http://"),
    ],
)
def test_serve_refuses_incomplete_vllm_options_before_loading_anything(argv, message, capsys):
    from softprompt.cli import main

    assert main(["serve", *argv]) != 0
    assert message in capsys.readouterr().err


def test_starting_vllm_with_a_python_that_does_not_exist_says_what_to_do(tmp_path):
    from softprompt.serve.vllm_process import start_vllm

    with pytest.raises(FileNotFoundError, match="make vllm"):
        start_vllm(tmp_path / "no-python", tmp_path, tmp_path / "log")


def test_vllm_python_starts_vllm_on_loopback_and_stops_it_with_the_server(model_dir, adapters, tmp_path):
    """`--vllm-python`: the front starts `PYTHON -m vllm.entrypoints.openai.api_server ...` on a
    free loopback port (here a Python that runs the stand-in), serves through it, and stops it."""
    import re
    import socket
    import sys
    from pathlib import Path

    from tests.test_serve_support import ServerProcess

    fake_python = tmp_path / "python"
    stand_in = Path(__file__).with_name("fake_vllm.py")
    fake_python.write_text(f'#!/bin/sh\nshift 2\nexec "{sys.executable}" "{stand_in}" "$@"\n')
    fake_python.chmod(0o755)
    args = ["--engine", "vllm", "--vllm-python", str(fake_python), "--model", str(model_dir)]
    server = ServerProcess([*args, "--adapters", str(adapters)], tmp_path / "front.log")
    try:
        server.wait_ready(timeout=120)
        import httpx

        ask = {"model": "alpha", "prompt": "good movie", "max_tokens": 3, "temperature": 0}
        r = httpx.post(server.url + "/v1/completions", json=ask, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length", r.text
        port = int(re.search(r"vLLM is ready at http://127\.0\.0\.1:(\d+)/v1", server.output()).group(1))
    finally:
        assert server.terminate() is not None
    with socket.socket() as s, pytest.raises(OSError):  # the stand-in is gone with the server
        s.settimeout(2)
        s.connect(("127.0.0.1", port))
