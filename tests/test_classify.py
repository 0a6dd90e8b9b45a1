"""`classify_texts` and `softprompt classify`: the same rank classification as eval."""

from __future__ import annotations

import json

import pytest
import torch

from softprompt.cli import main
from softprompt.scoring.classify import classify_texts, run_settings
from softprompt.scoring.metrics import Verbalizer, classify, encode
from tests.test_serve_support import LABEL_WORDS, TEMPLATE, build_served_folder, load_library

TEXTS = ["good movie", "the plot was very boring", "love it so", "awful acting"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    return build_served_folder(tmp_path_factory.mktemp("classify"))


def test_classify_texts_equals_eval_scoring(served):
    model_dir, adapters_dir = served
    model, tok = load_library(model_dir, adapters_dir, names=("sst",))
    got = classify_texts(model, tok, TEXTS, adapter="sst", template=TEMPLATE, label_words=LABEL_WORDS)
    verbalizer = Verbalizer.build(tok, LABEL_WORDS)
    scores = classify(model, encode(tok, TEXTS, TEMPLATE, 256), verbalizer, tok.pad_token_id, adapter="sst")
    probs = torch.softmax(scores.double(), dim=1)
    for row, p, s in zip(got, probs, scores):
        assert row["label"] == verbalizer.labels[int(s.argmax())]
        assert list(row["probs"]) == list(LABEL_WORDS)
        assert [row["probs"][k] for k in LABEL_WORDS] == pytest.approx(p.tolist(), abs=1e-9)
        assert sum(row["probs"].values()) == pytest.approx(1.0)
    assert classify_texts(model, tok, [], adapter="sst", template=TEMPLATE, label_words=LABEL_WORDS) == []


def test_run_settings_reads_the_run_config(served):
    _, adapters_dir = served
    settings = run_settings(adapters_dir / "sst")
    assert settings["template"] == TEMPLATE and settings["label_words"] == LABEL_WORDS
    assert run_settings(adapters_dir / "qa") == {}


def test_cli_classify_file_and_arguments(served, tmp_path, capsys):
    model_dir, adapters_dir = served
    data = tmp_path / "new.jsonl"
    data.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "preds.jsonl"
    assert (
        main(["classify", "--adapter", str(adapters_dir / "sst"), "--data", str(data), "--output", str(out)])
        == 0
    )
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    model, tok = load_library(model_dir, adapters_dir, names=("sst",))
    expected = classify_texts(
        model, tok, TEXTS, adapter="sst", template=TEMPLATE, label_words=LABEL_WORDS, max_length=64
    )
    assert [r["id"] for r in rows] == list(range(len(TEXTS)))
    assert [r["prediction"] for r in rows] == [e["label"] for e in expected]
    for r, e in zip(rows, expected):
        assert r["probs"] == pytest.approx(e["probs"])
    capsys.readouterr()
    assert main(["classify", "--adapter", str(adapters_dir / "sst"), "--json", *TEXTS[:2]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["prediction"] for p in printed] == [e["label"] for e in expected[:2]]


def test_cli_classify_without_run_settings_asks_for_them(served, capsys):
    _, adapters_dir = served
    assert main(["classify", "--adapter", str(adapters_dir / "qa"), "good"]) == 2
    assert "--label-words" in capsys.readouterr().err
