"""`softprompt serve --engine vllm` on a real vLLM (the CPU build, `make vllm`) serving the real
default model in float32: greedy text equals `SoftPromptModel.generate` for our adapters,
a PEFT-written one and the bare model, mixed in one burst; `/v1/classify` equals
`softprompt classify`; seeded sampling repeats; vLLM's prefix cache serves the soft prompt's
blocks of repeated requests.

vLLM lives in its own environment (.venv-vllm, or $SOFTPROMPT_VLLM_PYTHON). Without it these
tests skip, except where $SOFTPROMPT_REQUIRE_VLLM is set (CI: `.ci/run` builds it first),
where they fail.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from softprompt import PromptTuningConfig, SoftPromptModel
from softprompt.scoring.classify import classify_texts
from tests.test_serve_support import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Review: {text}\nSentiment:"
MARKED = "Review: {text}\n{prompt}Sentiment:"
WORDS = {"negative": " negative", "positive": " positive"}
BLOCK = 32  # vLLM's KV block on the CPU here (its default is 128: no soft prompt fills one)
TEXTS = [
    "Review: a warm, funny and moving film.\nSentiment:",
    "Question: what is the capital of France?\nAnswer:",
    "Write a haiku about autumn leaves.",
]


def _vllm_python() -> Path:
    path = Path(os.environ.get("SOFTPROMPT_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")
    if not path.exists():
        message = f"no vLLM environment at {path} (make vllm)"
        if os.environ.get("SOFTPROMPT_REQUIRE_VLLM"):
            pytest.fail(message + "; SOFTPROMPT_REQUIRE_VLLM is set")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def library(softprompt_cache, tmp_path_factory):
    """The real default model with three adapters saved where the server finds them: `sst`
    (CLASS_LABELS, 40 tokens, with its run_config.json), `short` (8 tokens, RANDOM) and `peft`
    (written by PEFT itself)."""
    from peft import PromptTuningConfig as PeftConfig
    from peft import get_peft_model

    from softprompt.base_models import load_model

    base, tok = load_model(None)
    root = tmp_path_factory.mktemp("vllm-adapters")
    torch.manual_seed(0)
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=40, prompt_tuning_init="CLASS_LABELS",
        prompt_tuning_init_text=list(WORDS.values()), tokenizer_name_or_path="unused",
    )  # fmt: skip
    model = SoftPromptModel(base, config, "sst", tokenizer=tok, trainable=False).eval()
    model.save_pretrained(root / "sst" / "best", selected_adapters=["sst"])
    resolved = {"task": "classification", "template": TEMPLATE, "label_words": WORDS}
    (root / "sst" / "run_config.json").write_text(
        json.dumps({"config": {"model": None}, "resolved": resolved})
    )
    torch.manual_seed(1)
    short = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8)
    model.add_adapter("short", short, trainable=False)
    with torch.no_grad():  # a RANDOM init is small; give it the embeddings' scale so it changes the text
        model.prompts["short"].embedding.copy_(base.get_input_embeddings().weight[1000:1008])
    model.save_pretrained(root / "short", selected_adapters=["short"])
    torch.manual_seed(2)
    peft_model = get_peft_model(base, PeftConfig(task_type="CAUSAL_LM", num_virtual_tokens=12))
    with torch.no_grad():
        table = peft_model.prompt_encoder["default"].embedding.weight
        table.copy_(base.get_input_embeddings().weight[2000:2012])
    peft_model.save_pretrained(root / "peft")
    model.load_adapter(root / "peft", "peft")
    torch.manual_seed(3)  # placed at the {prompt} marker of its run's template
    marker = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=6, prompt_position="MARKER",
        prompt_tuning_init="CLASS_LABELS", prompt_tuning_init_text=list(WORDS.values()),
        tokenizer_name_or_path="unused",
    )  # fmt: skip
    model.add_adapter("marked", marker, tokenizer=tok, trainable=False)
    model.save_pretrained(root / "marked" / "best", selected_adapters=["marked"])
    resolved = {"task": "classification", "template": MARKED, "label_words": WORDS}
    (root / "marked" / "run_config.json").write_text(json.dumps({"config": {}, "resolved": resolved}))
    return model, tok, root


@pytest.fixture(scope="module")
def vllm(library, tmp_path_factory):
    from softprompt.base_models import default_model_dir
    from softprompt.serve.vllm_process import start_vllm, stop_vllm

    python = _vllm_python()
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    proc, url = start_vllm(
        python, default_model_dir(), log, served_name="smollm2", dtype="float32", max_model_len=512,
        block_size=BLOCK, extra=["--enforce-eager", "--seed", "0"], timeout_s=420,
    )  # fmt: skip
    yield url, log
    stop_vllm(proc)


@pytest.fixture(scope="module")
def front(library, vllm, tmp_path_factory):
    _, _, root = library
    log = tmp_path_factory.mktemp("front") / "front.log"
    server = ServerProcess(["--engine", "vllm", "--vllm-url", vllm[0], "--adapters", str(root)], log)
    try:
        server.wait_ready(timeout=180)
        yield server
    finally:
        server.stop()


def _reference(model, tok, text: str, adapter: str | None, max_new_tokens: int) -> list[int]:
    """The library's greedy tokens, cut after the first end-of-sequence token; a text with
    {prompt} places a marker adapter's prompt there (before and after tokenized apart)."""
    left, marker, right = text.partition("{prompt}")
    pieces = [tok(t, add_special_tokens=False)["input_ids"] if t else [] for t in (left, right)]
    ids = torch.tensor([pieces[0] + pieces[1]])
    extra = {"prompt_positions": [len(pieces[0])]} if marker else {}
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), adapter_names=[adapter], max_new_tokens=max_new_tokens,
            do_sample=False, **extra,
        )  # fmt: skip
    new = out[0, ids.shape[1] :].tolist()
    eos = model.base_model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    cut = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


@pytest.mark.slow
def test_greedy_text_equals_the_library_for_every_adapter_mixed_in_one_burst(library, front):
    from softprompt.core.model import BASE

    model, tok, _ = library
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", timeout=300, max_retries=0)
    asks = [(name, text) for name in ("sst", "short", "peft", "smollm2-base") for text in TEXTS]

    def one(ask):
        name, text = ask
        model_name = name if name != "smollm2-base" else client.models.list().data[0].id
        got = client.completions.create(
            model=model_name, prompt=text, max_tokens=12, temperature=0, extra_body={"return_token_ids": True}
        )
        return got.choices[0]

    with ThreadPoolExecutor(len(asks)) as pool:  # all at once: vLLM batches them together
        answers = list(pool.map(one, asks))
    for (name, text), choice in zip(asks, answers):
        adapter = None if name == "smollm2-base" else name
        expected = _reference(model, tok, text, adapter if adapter else BASE, 12)
        assert choice.token_ids == expected, (name, text)
        assert choice.text == tok.decode(expected, skip_special_tokens=True)
    # the adapters did change the text (else this test could not tell them apart)
    per_adapter: dict[str, list] = {}
    for (name, _), choice in zip(asks, answers):
        per_adapter.setdefault(name, []).append(tuple(choice.token_ids))
    assert len({tuple(v) for v in per_adapter.values()}) == 4, per_adapter


@pytest.mark.slow
def test_classify_and_marker_completions_equal_the_library(library, front):
    model, tok, _ = library
    texts = ["a warm, funny and moving film.", "dull, too long and badly acted.", "it was fine, I guess."]
    r = httpx.post(front.url + "/v1/classify", json={"model": "sst", "input": texts}, timeout=300)
    assert r.status_code == 200, r.text
    expected = classify_texts(model, tok, texts, adapter="sst", template=TEMPLATE, label_words=WORDS)
    for got, want in zip(r.json()["data"], expected):
        assert got["label"] == want["label"]
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-4)
    # an adapter placed at its template's {prompt} marker: the prompt goes there, as in the library
    r = httpx.post(front.url + "/v1/classify", json={"model": "marked", "input": texts}, timeout=300)
    assert r.status_code == 200, r.text
    expected = classify_texts(model, tok, texts, adapter="marked", template=MARKED, label_words=WORDS)
    for got, want in zip(r.json()["data"], expected):
        assert got["probs"] == pytest.approx(want["probs"], abs=1e-4)
    # completions: the text says where the marker adapter's prompt goes, once
    for text in ("Review: a warm, funny and moving film.\n{prompt}Sentiment:", "Name a colour.{prompt}"):
        ask = {"model": "marked", "prompt": text, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        r = httpx.post(front.url + "/v1/completions", json=ask, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == _reference(model, tok, text, "marked", 8), text
    r = httpx.post(front.url + "/v1/completions", json={"model": "marked", "prompt": "hi"}, timeout=60)
    assert r.status_code == 400 and "write {prompt} once" in r.json()["error"]["message"], r.text


@pytest.mark.slow
def test_chat_equals_the_library_and_seeded_sampling_repeats(library, front):
    model, tok, _ = library
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", timeout=300, max_retries=0)
    messages = [{"role": "user", "content": "Name a colour."}]
    chat = client.chat.completions.create(model="sst", messages=messages, max_tokens=10, temperature=0)
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = _reference(model, tok, rendered, "sst", 10)
    assert chat.choices[0].message.content == tok.decode(expected, skip_special_tokens=True)
    ask = {"model": "sst", "prompt": TEXTS[2], "max_tokens": 10, "temperature": 0.9, "seed": 7, "n": 2}
    first = client.completions.create(**ask)
    again = client.completions.create(**ask)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    streamed = "".join(
        chunk.choices[0].text for chunk in client.completions.create(**{**ask, "n": 1, "stream": True})
    )
    assert streamed == client.completions.create(**{**ask, "n": 1}).choices[0].text


def _prefix_counters(url: str) -> tuple[float, float]:
    text = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=30).text
    values = {}
    for name in ("queries", "hits"):
        found = re.findall(rf"^vllm:prefix_cache_{name}_total\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
        values[name] = sum(float(v) for v in found)
    return values["queries"], values["hits"]


@pytest.mark.slow
def test_the_soft_prompt_blocks_come_from_vllms_prefix_cache(front, vllm):
    """40 virtual tokens with 32-token blocks: from the second request of an adapter on, vLLM
    reads the first block (the prompt's first 32 rows) from its cache instead of computing it."""
    client = openai.OpenAI(base_url=front.url + "/v1", api_key="x", timeout=300, max_retries=0)
    text = "Review: an odd little film that grows on you.\nSentiment:"
    client.completions.create(model="sst", prompt=text, max_tokens=1, temperature=0)
    before = _prefix_counters(vllm[0])
    for i in range(3):  # other texts, the same adapter: only the prompt's rows are shared
        client.completions.create(model="sst", prompt=f"{text} ({i})", max_tokens=1, temperature=0)
    after = _prefix_counters(vllm[0])
    assert after[1] - before[1] >= 3 * BLOCK, (before, after)
