"""The command line end to end on a tiny local model: train -> eval -> generate -> inspect.

Assertions are on the files and numbers produced, not on printed text.
"""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from softprompt.cli import main, parse_label_words
from tests.tiny import review_workspace, workspace_args


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return review_workspace(
        tmp_path_factory.mktemp("cli"), {"train": (64, 1), "dev": (16, 2), "test": (20, 3)}
    )


def _train_args(ws, out, *extra):
    return [
        "train",
        *workspace_args(ws),
        "--output",
        str(out),
        "--template",
        "Review: {text}\\nSentiment:",
        "--max-steps",
        "8",
        "--batch-size",
        "8",
        "--eval-every",
        "4",
        "--eval-samples",
        "none",
        "--checkpoint-every",
        "4",
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.1",
        "--warmup-steps",
        "2",
        *extra,
    ]


@pytest.fixture(scope="module")
def trained(workspace):
    out = workspace / "run"
    assert main(_train_args(workspace, out)) == 0
    return out


def test_train_writes_adapters_metrics_plot_and_config(trained):
    for sub in ("best", "last"):
        assert (trained / sub / "adapter_config.json").exists() and (
            trained / sub / "adapter_model.safetensors"
        ).exists()
    records = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r and "event" not in r]
    assert steps == [8]  # log_every=10: the last step is always logged
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [4, 8] and all(0 <= r["dev_accuracy"] <= 1 for r in evals)
    assert (trained / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((trained / "run_config.json").read_text())
    assert (
        config["config"]["max_steps"] == 8 and config["resolved"]["template"] == "Review: {text}\nSentiment:"
    )
    assert config["resolved"]["label_words"] == {"negative": " negative", "positive": " positive"}
    results = json.loads((trained / "results.json").read_text())
    assert results["final_split"] == "test" and results["tuned"]["examples"] == 20
    assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]
    best_step = next(r for r in records if r.get("event") == "end")["best_step"]
    assert best_step in (4, 8)


def test_eval_reproduces_the_training_runs_test_score(trained, workspace, tmp_path):
    out = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "--adapter",
                f"tuned={trained / 'best'}",
                "--data",
                str(workspace / "test.jsonl"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    results = json.loads((trained / "results.json").read_text())
    assert rows["tuned"]["accuracy"] == pytest.approx(results["tuned"]["accuracy"])
    assert rows["bare model (zero-shot)"]["accuracy"] == pytest.approx(results["zero_shot"]["accuracy"])


def test_generate_and_inspect(trained, capsys):
    assert (
        main(
            [
                "generate",
                "--adapter",
                str(trained / "best"),
                "--zero-shot",
                "--json",
                "--max-new-tokens",
                "3",
                "good movie",
                "bad plot",
            ]
        )
        == 0
    )
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 4 and {r["input"] for r in results} == {"good movie", "bad plot"}
    assert (
        main(["inspect", str(trained / "best"), "--compare", str(trained / "last"), "--json", "--top-k", "3"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert len(report["tokens"]) == 4 and all(len(t["nearest"]) == 3 for t in report["tokens"])
    assert all(t["norm"] > 0 for t in report["tokens"])
    assert report["comparison"]["lengths"] == [4, 4]
    assert -1 <= report["comparison"]["mean_position_cosine"] <= 1


def test_training_lowers_the_loss(workspace, tmp_path):
    # A random tiny model cannot be steered to classify (that needs a pretrained model: see
    # test_real_model.py); the loss on the training data must still go down.
    out = tmp_path / "longer"
    args = _train_args(
        workspace,
        out,
        "--max-steps",
        "30",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "30",
        "--log-every",
        "5",
        "--no-zero-shot",
    )
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r and "event" not in r]
    assert len(losses) == 6 and losses[-1] < 0.9 * losses[0]


def test_an_existing_run_is_never_overwritten_silently(trained, workspace, capsys):
    before = (trained / "best" / "adapter_model.safetensors").read_bytes()
    assert main(_train_args(workspace, trained)) == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained / "best" / "adapter_model.safetensors").read_bytes() == before


def test_bad_data_is_a_one_line_error(workspace, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good movie", "label": "positive"}\n{"text": "bad", "lable": "negative"}\n')
    code = main(
        ["train", "--model", str(workspace / "model"), "--data", str(bad), "--output", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code == 2 and "bad.jsonl" in err and "line 2" in err and "label" in err
    assert "Traceback" not in err


def test_label_words_option():
    assert parse_label_words("positive= great,negative= awful") == {
        "positive": " great",
        "negative": " awful",
    }
    assert parse_label_words('{"a": " x"}') == {"a": " x"}
    with pytest.raises(argparse.ArgumentTypeError):
        parse_label_words("nonsense")


def test_same_seed_same_prompt(workspace, tmp_path):
    prompts = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert (
            main(_train_args(workspace, out, "--max-steps", "3", "--eval-every", "0", "--no-zero-shot")) == 0
        )
        from safetensors.torch import load_file

        prompts.append(load_file(out / "last" / "adapter_model.safetensors")["prompt_embeddings"])
    assert torch.equal(prompts[0], prompts[1])
