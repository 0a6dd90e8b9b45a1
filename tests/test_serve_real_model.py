"""The server on the real default model (SmolLM2-135M-Instruct) with the demo's kind of
adapter: a freshly initialised CLASS_LABELS prompt and its run_config.json."""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.scoring.classify import classify_texts
from tests.test_serve_support import ServerProcess

TEMPLATE = "Review: {text}\nSentiment:"
WORDS = {"negative": " negative", "positive": " positive"}


@pytest.mark.slow
def test_real_default_model_served_equals_library(tmp_path):
    from softprompt.base_models import load_model

    base, tok = load_model(None)
    torch.manual_seed(0)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=20,
        prompt_tuning_init="CLASS_LABELS",
        prompt_tuning_init_text=list(WORDS.values()),
        tokenizer_name_or_path="unused",
    )
    model = SoftPromptModel(base, config, "sst", tokenizer=tok, trainable=False).eval()
    run = tmp_path / "run"
    model.save_pretrained(run / "best", selected_adapters=["sst"])
    resolved = {"task": "classification", "template": TEMPLATE, "label_words": WORDS}
    (run / "run_config.json").write_text(json.dumps({"config": {"model": None}, "resolved": resolved}))
    server = ServerProcess(["--adapters", str(tmp_path)], tmp_path / "server.log")
    try:
        server.wait_ready(timeout=240)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", timeout=120, max_retries=0)
        text = "Review: a warm, funny and moving film.\nSentiment:"
        got = client.completions.create(
            model="run", prompt=text, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                adapter_names=["sst"],
                max_new_tokens=12,
                do_sample=False,
            )
        new = ref[0, ids.shape[1] :].tolist()
        eos = base.generation_config.eos_token_id
        eos = {eos} if isinstance(eos, int) else set(eos or [])
        cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
        assert got.choices[0].token_ids == new[:cut]
        assert "decoding in packed steps" in server.output()  # SmolLM2 passes the start-up check
        texts = ["a warm, funny and moving film.", "dull, too long and badly acted."]
        r = httpx.post(server.url + "/v1/classify", json={"model": "run", "input": texts}, timeout=120)
        assert r.status_code == 200, r.text
        expected = classify_texts(model, tok, texts, adapter="sst", template=TEMPLATE, label_words=WORDS)
        for g, e in zip(r.json()["data"], expected):
            assert g["label"] == e["label"] and g["probs"] == pytest.approx(e["probs"], abs=1e-5)
    finally:
        server.stop()
