"""The HTTP app in-process (FastAPI's TestClient, a tiny model): /health while the model
loads and after the worker died, and adapters of another base model refused at start-up."""

from __future__ import annotations

import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.serve.app import ServeConfig, Server, create_app
from softprompt.serve.engine import PLACEHOLDER
from tests.tiny import build_model, make_tokenizer


def _loaded(seed: int = 1):
    model = SoftPromptModel(
        build_model("CAUSAL_LM", "llama", seed=seed),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=1),
        PLACEHOLDER,
        trainable=False,
    )
    return model.eval(), make_tokenizer()


def _adapter(folder, seed: int):
    torch.manual_seed(3)
    model = SoftPromptModel(
        build_model("CAUSAL_LM", "llama", seed=seed),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2),
        "x",
    )
    model.save_pretrained(folder)
    return folder


def _wait_for(client: TestClient, status: int, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        r = client.get("/health")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_health_is_503_while_loading_then_200():
    release = threading.Event()

    def loader():
        assert release.wait(30)
        return _loaded()

    with TestClient(create_app(ServeConfig(base_id="base"), loader)) as client:
        r = client.get("/health")
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "the model is still loading; retry shortly."
        models = client.get("/v1/models")
        assert models.status_code == 503 and models.json()["error"]["type"]
        release.set()
        assert _wait_for(client, 200).json() == {"status": "ok"}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected fault
def test_health_is_503_after_the_worker_died_and_requests_get_a_clean_error():
    app = create_app(ServeConfig(base_id="base"), _loaded)
    with TestClient(app) as client:
        assert _wait_for(client, 200).status_code == 200
        server = app.state.server
        engine = server.engine

        def boom(running_rows):
            raise RuntimeError("injected fault in the worker loop")

        engine.scheduler.admit = boom  # the worker calls it between steps, idle or not
        engine._thread.join(10)
        assert not engine.alive and engine.state == "dead"
        health = client.get("/health")
        assert health.status_code == 503
        assert "the model worker is not running" in health.json()["error"]["message"]
        after = client.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 1})
        assert after.status_code == 503 and after.json()["error"]["type"]


def test_start_up_refuses_an_adapter_of_another_base_unless_allowed(tmp_path):
    folder = _adapter(tmp_path / "alien", seed=2)
    server = Server(ServeConfig(base_id="base", adapters={"alien": str(folder)}), lambda: _loaded(seed=1))
    server.load()
    assert server.state == "failed"
    assert "was saved from base model" in server.error and "--allow-base-mismatch" in server.error
    allowed = Server(
        ServeConfig(base_id="base", adapters={"alien": str(folder)}, allow_base_mismatch=True),
        lambda: _loaded(seed=1),
    )
    allowed.load()
    try:
        assert allowed.state == "ready" and allowed.engine.has_adapter("alien")
    finally:
        allowed.engine.stop(5)


@pytest.mark.parametrize("packed", [True, False])
def test_a_marker_adapter_completes_with_its_prompt_where_the_text_says(tmp_path, packed):
    """An adapter placed at a {prompt} marker: the completion's text says where (once); the
    tokens are the library's with `prompt_positions` (the text before and after the marker
    tokenized separately); chat and a text without the marker are refused with the reason."""
    torch.manual_seed(5)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_position="MARKER")
    library = SoftPromptModel(build_model("CAUSAL_LM", "llama", seed=1), config, "mk", trainable=False).eval()
    with torch.no_grad():
        library.prompts["mk"].embedding.mul_(40)  # large enough to change the greedy tokens
    library.save_pretrained(tmp_path / "mk", selected_adapters=["mk"])
    tok = make_tokenizer()
    server = ServeConfig(base_id="base", adapters={"mk": str(tmp_path / "mk")}, packed=packed)
    with TestClient(create_app(server, loader=lambda: _loaded(1))) as client:
        assert _wait_for(client, 200).status_code == 200
        for text in ("good {prompt}movie", "{prompt}the plot was very boring", "love it {prompt}"):
            ask = {"model": "mk", "prompt": text, "max_tokens": 5, "temperature": 0}
            r = client.post("/v1/completions", json={**ask, "return_token_ids": True})
            assert r.status_code == 200, r.text
            left, right = text.split("{prompt}")
            pieces = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in (left, right)]
            ids = torch.tensor([pieces[0] + pieces[1]])
            with torch.no_grad():
                out = library.generate(
                    ids, attention_mask=torch.ones_like(ids), adapter_names=["mk"], max_new_tokens=5,
                    do_sample=False, prompt_positions=[len(pieces[0])],
                )  # fmt: skip
            expected = out[0, ids.shape[1] :].tolist()
            stops = {tok.eos_token_id, library.base_model.generation_config.eos_token_id}
            cut = next((i + 1 for i, t in enumerate(expected) if t in stops), len(expected))
            assert r.json()["choices"][0]["token_ids"] == expected[:cut], text
        r = client.post("/v1/completions", json={"model": "mk", "prompt": "good movie", "max_tokens": 2})
        assert r.status_code == 400 and "write {prompt} once" in r.json()["error"]["message"]
        chat = {"model": "mk", "messages": [{"role": "user", "content": "hi"}]}
        r = client.post("/v1/chat/completions", json=chat)
        assert r.status_code == 400 and "marker" in r.json()["error"]["message"]
