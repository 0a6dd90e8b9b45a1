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
from softprompt.serve.app import ServeConfig, _Server, create_app
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
    server = _Server(ServeConfig(base_id="base", adapters={"alien": str(folder)}), lambda: _loaded(seed=1))
    server.load()
    assert server.state == "failed"
    assert "was saved from base model" in server.error and "--allow-base-mismatch" in server.error
    allowed = _Server(
        ServeConfig(base_id="base", adapters={"alien": str(folder)}, allow_base_mismatch=True),
        lambda: _loaded(seed=1),
    )
    allowed.load()
    try:
        assert allowed.state == "ready" and allowed.engine.has_adapter("alien")
    finally:
        allowed.engine.stop(5)
