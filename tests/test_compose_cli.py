"""Composed prompts through the command line, on a tiny local model: a template with
{prompt} through train -> eval -> classify -> generate, ensembles in eval / classify
(equal to the members scored alone), train --seeds, and the errors of bad combinations.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from softprompt.base_models import load_model
from softprompt.cli import main
from softprompt.core.model import SoftPromptModel
from softprompt.scoring.classify import classify_texts
from softprompt.scoring.compose import encode_template, pad_templated, tokenize_template
from softprompt.scoring.ensemble import evaluate_ensemble
from softprompt.scoring.metrics import Verbalizer, classify, pad_id
from tests.tiny import review_rows, review_workspace, workspace_args

TEMPLATE = "Review: {text}\n{prompt}Sentiment:"
LABEL_WORDS = {"negative": " negative", "positive": " positive"}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return review_workspace(
        tmp_path_factory.mktemp("compose_cli"), {"train": (48, 1), "dev": (12, 2), "test": (20, 3)}
    )


def _train_args(ws, out, *extra):
    return [
        "train",
        *workspace_args(ws),
        "--output",
        str(out),
        "--template",
        TEMPLATE.replace("\n", "\\n"),
        "--max-steps",
        "6",
        "--batch-size",
        "8",
        "--eval-every",
        "3",
        "--checkpoint-every",
        "6",
        "--num-virtual-tokens",
        "3",
        "--lr",
        "0.1",
        "--warmup-steps",
        "1",
        *extra,
    ]


@pytest.fixture(scope="module")
def marker_run(ws):
    out = ws / "marker"
    assert main(_train_args(ws, out)) == 0
    return out


@pytest.fixture(scope="module")
def seeds_run(ws):
    out = ws / "seeds"
    assert main(_train_args(ws, out, "--seeds", "0,1,2", "--no-zero-shot", "--eval-every", "0")) == 0
    return out


def _model(ws, adapters):
    base, tokenizer = load_model(str(ws / "model"))
    model = SoftPromptModel.from_pretrained(base, adapters[0][1], adapter_name=adapters[0][0])
    for name, path in adapters[1:]:
        model.load_adapter(path, name)
    return model.eval(), tokenizer


def test_marker_template_train_eval_classify_generate(marker_run, ws, tmp_path, capsys):
    best = marker_run / "best"
    assert json.loads((best / "adapter_config.json").read_text())["prompt_position"] == "MARKER"
    config = json.loads((marker_run / "run_config.json").read_text())
    assert config["resolved"]["template"] == TEMPLATE
    assert config["resolved"]["prompt"]["prompt_position"] == "MARKER"
    results = json.loads((marker_run / "results.json").read_text())

    # eval (template and label words from the run) reproduces the run's own test score
    out = tmp_path / "eval.json"
    args = ["eval", "--adapter", f"tuned={best}", "--data", str(ws / "test.jsonl"), "--output", str(out)]
    assert main(args) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["tuned"]["accuracy"] == pytest.approx(results["tuned"]["accuracy"])
    assert rows["bare model (zero-shot)"]["accuracy"] == pytest.approx(results["zero_shot"]["accuracy"])

    # the prompt sits at the marker: the scores are those of the hand-built templated batch
    texts = [r["text"] for r in review_rows(6, 9)]
    capsys.readouterr()
    assert main(["classify", "--adapter", str(best), "--json", *texts]) == 0
    labelled = json.loads(capsys.readouterr().out)
    model, tokenizer = _model(ws, [("m", best)])
    verbalizer = Verbalizer.build(tokenizer, LABEL_WORDS)
    rows_, positions = encode_template(tokenizer, texts, TEMPLATE, 256)
    assert positions is not None and all(0 < p < len(r) for p, r in zip(positions, rows_))
    scores = classify(
        model, rows_, verbalizer, pad_id(tokenizer), adapter="m", prompt_positions=positions
    ).softmax(-1)
    for row, probs in zip(labelled, scores):
        assert row["probs"] == pytest.approx(dict(zip(verbalizer.labels, probs.tolist())), abs=1e-5)
    alone = classify_texts(model, tokenizer, texts, adapter="m", template=TEMPLATE, label_words=LABEL_WORDS)
    assert [r["prediction"] for r in labelled] == [r["label"] for r in alone]

    # generate: the same tokens as model.generate given the templated batch
    assert main(["generate", "--adapter", str(best), "--json", "--max-new-tokens", "3", *texts[:3]]) == 0
    generated = json.loads(capsys.readouterr().out)
    ids, mask, pos = pad_templated(tokenize_template(tokenizer, TEMPLATE, texts[:3]), pad_id(tokenizer))
    ref = model.generate(
        input_ids=ids,
        attention_mask=mask,
        prompt_positions=pos,
        adapter_names="m",
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=pad_id(tokenizer),
    )
    expected = [tokenizer.decode(ref[i, ids.shape[1] :], skip_special_tokens=True) for i in range(3)]
    assert [g["output"] for g in generated] == expected

    # the same adapter with a template without {prompt}: a clear error, not a silent prefix
    code = main(["classify", "--adapter", str(best), "--template", "Review: {text}\\nSentiment:", "good"])
    err = capsys.readouterr().err
    assert code == 2 and "marker" in err and "{prompt}" in err


def test_train_seeds_writes_each_run_and_the_ensemble(seeds_run):
    top = json.loads((seeds_run / "results.json").read_text())
    assert top["seeds"] == [0, 1, 2] and top["final_split"] == "test"
    assert list(top["members"]) == ["seed-0", "seed-1", "seed-2"]
    for k in (0, 1, 2):
        run = seeds_run / f"seed-{k}"
        assert json.loads((run / "run_config.json").read_text())["config"]["seed"] == k
        assert (run / "best" / "adapter_model.safetensors").exists()
        own = json.loads((run / "results.json").read_text())["tuned"]
        assert top["members"][f"seed-{k}"]["accuracy"] == pytest.approx(own["accuracy"])
    accuracies = [m["accuracy"] for m in top["members"].values()]
    assert top["member_mean"]["accuracy"] == pytest.approx(sum(accuracies) / 3)
    assert top["best_member"]["accuracy"] == max(accuracies)
    assert top["ensemble"]["examples"] == 20 and 0 <= top["ensemble"]["accuracy"] <= 1
    # each seed's folder keeps train's semantics: no silent overwrite
    assert main(_train_args(seeds_run.parent, seeds_run, "--seeds", "0,1,2", "--no-zero-shot")) == 2


def test_eval_ensemble_is_the_mean_of_the_members_alone(seeds_run, ws, tmp_path):
    adapters = [(f"s{k}", seeds_run / f"seed-{k}" / "best") for k in (0, 1, 2)]
    out = tmp_path / "ens.json"
    args = ["eval", "--no-zero-shot", "--ensemble", "--data", str(ws / "test.jsonl"), "--output", str(out)]
    args.append("--no-bf16")  # compared with float32 runs of each member alone below
    for name, path in adapters:
        args += ["--adapter", f"{name}={path}"]
    assert main(args) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}

    model, tokenizer = _model(ws, adapters)
    test = review_rows(20, 3)
    texts, labels = [r["text"] for r in test], [r["label"] for r in test]
    verbalizer = Verbalizer.build(tokenizer, LABEL_WORDS)
    rows_, positions = encode_template(tokenizer, texts, TEMPLATE, 256)
    alone = torch.stack(
        [
            F.log_softmax(
                classify(model, rows_, verbalizer, pad_id(tokenizer), adapter=n, prompt_positions=positions),
                -1,
            )
            for n, _ in adapters
        ]
    )
    gold = torch.tensor([verbalizer.index(label) for label in labels])
    for m, (name, _) in enumerate(adapters):
        assert rows[name]["accuracy"] == pytest.approx(float((alone[m].argmax(-1) == gold).float().mean()))
    mean = alone.mean(0)
    assert rows["ensemble of 3 (mean log-prob)"]["accuracy"] == pytest.approx(
        float((mean.argmax(-1) == gold).float().mean())
    )

    # the same from Python
    result = evaluate_ensemble(
        model, tokenizer, [n for n, _ in adapters], texts, labels, template=TEMPLATE, label_words=LABEL_WORDS
    )
    torch.testing.assert_close(result.scores.members, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(result.scores.mean, mean, atol=1e-5, rtol=1e-5)
    assert {"model": "ensemble of 3 (mean log-prob)", **result.ensemble} == rows[
        "ensemble of 3 (mean log-prob)"
    ]
    assert result.to_dict()["best_member"]["name"] == result.best_member


def test_classify_ensemble_reports_members(seeds_run, capsys):
    args = ["classify", "--ensemble", "--json", "good movie", "the plot was awful"]
    for k in (0, 1):
        args += ["--adapter", str(seeds_run / f"seed-{k}" / "best")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out) == 2 and all(len(r["members"]) == 2 for r in out)
    for r in out:
        # the ensemble's probabilities: softmax of the mean of the members' log-probabilities
        logs = torch.tensor(
            [[m["probs"][label] for label in r["probs"]] for m in r["members"].values()]
        ).log()
        probs = logs.mean(0).softmax(-1).tolist()
        assert list(r["probs"].values()) == pytest.approx(probs, abs=1e-5)


def test_bad_combinations_are_clear_errors(seeds_run, ws, tmp_path, capsys):
    # ensemble members trained with different label words
    other = tmp_path / "other"
    shutil.copytree(seeds_run / "seed-1", other)
    config = json.loads((other / "run_config.json").read_text())
    config["resolved"]["label_words"] = {"negative": " bad", "positive": " good"}
    (other / "run_config.json").write_text(json.dumps(config))
    first = seeds_run / "seed-0" / "best"
    for command in (["eval", "--data", str(ws / "test.jsonl")], ["classify", "good"]):
        code = main([*command, "--ensemble", "--adapter", str(first), "--adapter", str(other / "best")])
        err = capsys.readouterr().err
        assert code == 2 and "label words" in err and "' bad'" in err
    # one adapter is no ensemble; several adapters in classify need --ensemble
    assert main(["eval", "--ensemble", "--adapter", str(first), "--data", str(ws / "test.jsonl")]) == 2
    assert "two or more" in capsys.readouterr().err
    assert main(["classify", "--adapter", str(first), "--adapter", str(first), "good"]) == 2
    assert "--ensemble" in capsys.readouterr().err
    # a template with {prompt} but no {text}: refused before anything is written
    out = tmp_path / "never"
    args = _train_args(ws, out)
    args[args.index("--template") + 1] = "{prompt}Sentiment:"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "no {text}" in err and "Traceback" not in err
    assert not out.exists()


def test_generation_objective_with_a_marker_equals_each_row_alone(ws):
    from softprompt.core.config import PromptTuningConfig
    from softprompt.scoring.objectives import GenerationObjective

    base, tokenizer = load_model(str(ws / "model"))
    torch.manual_seed(0)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_position="MARKER")
    model = SoftPromptModel(base, config, tokenizer=tokenizer).eval()
    texts = ["good movie", "the plot was so very boring and bad", "fun"]
    objective = GenerationObjective.build(
        tokenizer, texts, ["positive", "negative", "positive"], "review {text} {prompt}sentiment", 64, 2
    )
    assert objective.prompt_positions == [len(objective.prompts[i]) - 1 for i in range(3)]
    with torch.no_grad():
        batch = objective.loss(model, [0, 1, 2])
        alone = []
        for i in range(3):
            ids = torch.tensor([objective.prompts[i] + objective.targets[i]])
            labels = ids.clone()
            labels[0, : len(objective.prompts[i])] = -100
            positions = torch.tensor([objective.prompt_positions[i]])
            alone.append(model(input_ids=ids, labels=labels, prompt_positions=positions).loss)
    # the batch loss is the mean over all target tokens: weight each row by its target count
    counts = torch.tensor([len(t) for t in objective.targets], dtype=torch.float)
    torch.testing.assert_close(
        batch, (torch.stack(alone) * counts).sum() / counts.sum(), atol=1e-5, rtol=1e-5
    )
    predicted = objective.predict(model, [0, 1, 2], "default", batch_size=3)
    for i in range(3):
        one = objective.generate(
            model, [objective.prompts[i]], "default", 1, prompt_positions=[objective.prompt_positions[i]]
        )
        assert predicted[i] == one[0]
