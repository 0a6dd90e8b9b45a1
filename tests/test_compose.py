"""Composing prompts: a prompt at a marker inside the input, several prompts per row,
ensembles in one pass, templates. Every result is checked against the base model fed the
full sequence of embeddings by hand, one row alone, no padding."""

from __future__ import annotations

import functools
import json
import string

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from softprompt import BASE, PromptTuningConfig, SoftPromptModel, wrap
from softprompt.core.config import PromptPosition
from softprompt.scoring.compose import (
    Templated,
    ensemble_scores,
    pad_templated,
    parse_template,
    tokenize_template,
)
from softprompt.scoring.metrics import Verbalizer, class_logits
from tests.tiny import EOS, PAD, VOCAB, WORDS, build_model, make_tokenizer

ATOL = 1e-5
NEW = 5
PROPERTY = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _model(task: str, arch: str, *, prefix_cache: bool = True) -> SoftPromptModel:
    """Adapters: "m" (3 tokens, at a marker), "m2" (5 tokens, at a marker), "p" (2, prefix)."""
    torch.manual_seed(0)
    base = build_model(task, arch)
    cfg = {"task_type": task, "prompt_tuning_init": "SAMPLE_VOCAB"}
    model = wrap(base, PromptTuningConfig(num_virtual_tokens=3, prompt_position="marker", **cfg), "m")
    model.add_adapter("m2", PromptTuningConfig(num_virtual_tokens=5, prompt_position="MARKER", **cfg))
    model.add_adapter("p", PromptTuningConfig(num_virtual_tokens=2, **cfg))
    model.prefix_cache = prefix_cache
    return model.eval()


def _rows(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g) for n in lengths]


def _pad(rows, positions, side):
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    shifted = []
    for i, (r, p) in enumerate(zip(rows, positions)):
        start = width - len(r) if side == "left" else 0
        ids[i, start : start + len(r)] = r
        mask[i, start : start + len(r)] = 1
        shifted.append(start + p)
    return ids, mask, torch.tensor(shifted)


def _prompt_of(model, row):
    if row is None or row == BASE:
        return None
    names = (row,) if isinstance(row, str) else row
    return torch.cat([model.get_prompt(n) for n in names])


def _by_hand(model, ids, position, row, **kwargs):
    """The base model fed `[user[:m]][prompt][user[m:]]` as embeddings, one row, no padding.

    Returns the output and the columns of the user's tokens."""
    embeds = model.base_model.get_input_embeddings()(ids)
    prompt = _prompt_of(model, row)
    if prompt is None:
        full, keep = embeds, list(range(len(ids)))
    else:
        m = position if model.placement(model.resolve_adapters([row], 1)[0]) is PromptPosition.MARKER else 0
        full = torch.cat([embeds[:m], prompt, embeds[m:]])
        keep = list(range(m)) + list(range(m + len(prompt), len(prompt) + len(ids)))
    return model.base_model(inputs_embeds=full.unsqueeze(0), **kwargs), keep, full


def _hand_lm_loss(logits, keep, ids):
    """Summed next-token loss of the user's tokens (each predicted by the column before it,
    virtual or not) and the number of scored tokens."""
    total, count = 0.0, 0
    for t, col in enumerate(keep):
        if col == 0:
            continue
        total = total + F.cross_entropy(logits[col - 1].unsqueeze(0), ids[t].unsqueeze(0), reduction="sum")
        count += 1
    return total, count


# ---------------------------------------------------------------------- marker placement
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_marker_rows_equal_the_row_alone_by_hand(arch, side):
    """Markers at the start, middle and end, mixed with a prefix adapter and a bare row:
    logits at the user's columns and the causal-LM loss equal the hand-built rows."""
    model = _model("CAUSAL_LM", arch)
    rows = _rows([5, 4, 6, 3, 4])
    positions = [0, 2, 6, 1, 3]  # start, middle, end, (ignored: prefix), (ignored: no prompt)
    names = ["m", "m2", "m", "p", BASE]
    ids, mask, shifted = _pad(rows, positions, side)
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, labels=ids, adapter_names=names, prompt_positions=shifted
        )
        total, count = 0.0, 0
        for i, (r, p, n) in enumerate(zip(rows, positions, names)):
            want, keep, _ = _by_hand(model, r, p, n)
            got = out.logits[i][mask[i].bool()]
            torch.testing.assert_close(got, want.logits[0, keep], atol=ATOL, rtol=0)
            s, c = _hand_lm_loss(want.logits[0], keep, r)
            total, count = total + s, count + c
    torch.testing.assert_close(out.loss, total / count, atol=ATOL, rtol=0)


def test_marker_changes_the_result_and_a_prefix_ignores_positions():
    model = _model("CAUSAL_LM", "llama")
    ids = _rows([6])[0].unsqueeze(0)
    with torch.no_grad():
        front = model(input_ids=ids, adapter_names="m", prompt_positions=[0]).logits
        inside = model(input_ids=ids, adapter_names="m", prompt_positions=[3]).logits
        p0 = model(input_ids=ids, adapter_names="p").logits
        p3 = model(input_ids=ids, adapter_names="p", prompt_positions=[3]).logits
    torch.testing.assert_close(
        inside[:, :3], model.base_model(input_ids=ids[:, :3]).logits, atol=ATOL, rtol=0
    )
    assert (front - inside).abs().max() > 1e-3
    assert torch.equal(p0, p3)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_marker_training_gradient_equals_the_hand_built_row(arch):
    model = _model("CAUSAL_LM", arch)
    model.train()
    rows = _rows([5, 3])
    ids, mask, shifted = _pad(rows, [2, 3], "left")
    model(
        input_ids=ids, attention_mask=mask, labels=ids, adapter_names="m", prompt_positions=shifted
    ).loss.backward()
    got = model.prompts["m"].embedding.grad.clone()
    model.zero_grad()
    total, count = 0.0, 0
    for r, p in zip(rows, [2, 3]):
        want, keep, _ = _by_hand(model, r, p, "m")
        s, c = _hand_lm_loss(want.logits[0], keep, r)
        total, count = total + s, count + c
    (total / count).backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, model.prompts["m"].embedding.grad, atol=1e-5, rtol=1e-4)


def test_marker_takes_the_plain_path_and_prefixes_keep_the_cache():
    cached = _model("CAUSAL_LM", "llama")
    assert cached.uses_prompt_cache("p", 2)
    assert not cached.uses_prompt_cache("m", 2, [1, 1])
    assert not cached.uses_prompt_cache(["p", "m"], 2, [1, 1])
    assert not cached.uses_prompt_cache([("p", "p")], 1)
    plain = _model("CAUSAL_LM", "llama", prefix_cache=False)
    rows = _rows([5, 4, 6])
    ids, mask, shifted = _pad(rows, [2, 0, 1], "left")
    kw = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": ids,
        "adapter_names": ["m", "p", "m2"],
        "prompt_positions": shifted,
    }
    with torch.no_grad():
        a, b = cached(**kw), plain(**kw)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.loss, b.loss)


@pytest.mark.parametrize("task,arch", [("SEQ_CLS", "bert"), ("SEQ_CLS", "llama"), ("TOKEN_CLS", "gpt2")])
def test_marker_classification_equals_the_row_alone(task, arch):
    model = _model(task, arch)
    rows = _rows([5, 3, 6])
    positions = [2, 3, 0]
    ids, mask, shifted = _pad(rows, positions, "right")
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, adapter_names=["m", "m2", "m"], prompt_positions=shifted
        )
        for i, (r, p, n) in enumerate(zip(rows, positions, ["m", "m2", "m"])):
            with _route(model, n):
                want, keep, _ = _by_hand(model, r, p, n)
            if task == "SEQ_CLS":
                torch.testing.assert_close(out.logits[i], want.logits[0], atol=ATOL, rtol=0)
            else:
                torch.testing.assert_close(
                    out.logits[i][mask[i].bool()], want.logits[0, keep], atol=ATOL, rtol=0
                )


def _route(model, name):
    from softprompt.core.heads import routed

    return routed(list(model.heads.values()), [(name, None)])


def test_marker_seq2seq_t5_equals_the_row_alone():
    model = _model("SEQ_2_SEQ_LM", "t5")
    rows = _rows([5, 3])
    positions = [2, 3]
    ids, mask, shifted = _pad(rows, positions, "right")
    labels = torch.randint(4, VOCAB, (2, 4))
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, labels=labels, adapter_names="m", prompt_positions=shifted
        )
        for i, (r, p) in enumerate(zip(rows, positions)):
            want, _, _ = _by_hand(model, r, p, "m", labels=labels[i : i + 1])
            torch.testing.assert_close(out.logits[i], want.logits[0], atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- generation
def _reference_greedy(model, ids, position, row, steps):
    """No cache: the full embeddings through the base model at every step, one row."""
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(steps):
            _, _, full = _by_hand(model, seq, position, row)
            logits = model.base_model(inputs_embeds=full.unsqueeze(0)).logits[0, -1]
            logits[EOS] = float("-inf")  # what min_new_tokens does
            seq = torch.cat([seq, logits.argmax().view(1)])
    return seq[len(ids) :]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_with_markers_equals_no_cache_reference(arch):
    model = _model("CAUSAL_LM", arch)
    rows = _rows([4, 6, 3, 5], seed=3)
    positions = [4, 2, 0, 1]  # end, middle, start, (prefix)
    names = ["m", "m2", "m", "p"]
    ids, mask, shifted = _pad(rows, positions, "left")
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        adapter_names=names,
        prompt_positions=shifted,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
    )
    assert torch.equal(out[:, : ids.shape[1]], ids)
    for i, (r, p, n) in enumerate(zip(rows, positions, names)):
        assert torch.equal(out[i, ids.shape[1] :], _reference_greedy(model, r, p, n, NEW)), i


def test_hand_written_decoding_loop_with_a_marker_continues_from_the_cache():
    """Prefill into a cache, then feed one token at a time with the user's mask: every
    step's logits equal the full hand-built sequence's, and the prompt is not re-inserted."""
    from transformers import DynamicCache

    model = _model("CAUSAL_LM", "llama")
    seq = _rows([5])[0]
    cache = DynamicCache(config=model.base_model.config)
    with torch.no_grad():
        out = model(
            input_ids=seq.unsqueeze(0), adapter_names="m", prompt_positions=[2], cache=cache, use_cache=True
        )
        for _ in range(3):
            _, _, full = _by_hand(model, seq, 2, "m")
            want = model.base_model(inputs_embeds=full.unsqueeze(0)).logits[0, -1]
            torch.testing.assert_close(out.logits[0, -1], want, atol=ATOL, rtol=0)
            assert cache.get_seq_length() == len(seq) + 3
            nxt = want.argmax().view(1)
            seq = torch.cat([seq, nxt])
            out = model(
                input_ids=nxt.unsqueeze(0),
                attention_mask=torch.ones(1, len(seq), dtype=torch.long),
                adapter_names="m",
                prompt_positions=[2],
                cache=cache,
                use_cache=True,
            )


# ---------------------------------------------------------------------- several prompts per row
def _combined(model, names, new="combo"):
    """A copy of the model with the concatenation of `names` as one single adapter."""
    cfg = model.peft_config[names[0]]
    size = sum(model.prompts[n].num_virtual_tokens for n in names)
    model.add_adapter(
        new,
        PromptTuningConfig(
            task_type=cfg.task_type, num_virtual_tokens=size, prompt_position=cfg.prompt_position
        ),
        init=torch.cat([model.prompts[n].embedding.detach() for n in names]),
    )
    return new


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_combinations_equal_one_concatenated_prompt_row_by_row(arch):
    model = _model("CAUSAL_LM", arch)
    model.add_adapter("q", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pq, qp = _combined(model, ["p", "q"], "pq"), _combined(model, ["q", "p"], "qp")
    mm = _combined(model, ["m", "m2"], "mm")
    rows = _rows([5, 4, 6, 3, 4])
    names = [("p", "q"), "q", ("q", "p"), ("m", "m2"), BASE]
    single = [pq, "q", qp, mm, BASE]
    ids, mask, shifted = _pad(rows, [0, 0, 0, 2, 0], "left")
    with torch.no_grad():
        got = model(
            input_ids=ids, attention_mask=mask, labels=ids, adapter_names=names, prompt_positions=shifted
        )
        for i in range(len(rows)):
            want = model(
                input_ids=rows[i].unsqueeze(0),
                adapter_names=[single[i]],
                prompt_positions=[[0, 0, 0, 2, 0][i]],
            )
            torch.testing.assert_close(got.logits[i][mask[i].bool()], want.logits[0], atol=ATOL, rtol=0)
        flat = model(
            input_ids=ids, attention_mask=mask, labels=ids, adapter_names=single, prompt_positions=shifted
        )
    torch.testing.assert_close(got.loss, flat.loss, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="mixes prompt placements"):
        model(input_ids=ids[:1], adapter_names=[("p", "m")], prompt_positions=[0])
    with pytest.raises(ValueError, match="adapter names"):
        model(input_ids=ids[:1], adapter_names=[("p", BASE)])
    with pytest.raises(KeyError, match="nope"):
        model(input_ids=ids[:1], adapter_names=[("p", "nope")])


def test_combination_generation_equals_the_concatenated_prompt():
    model = _model("CAUSAL_LM", "llama")
    pm = _combined(model, ["p", "p"], "pp")
    rows = _rows([4, 6])
    ids, mask, _ = _pad(rows, [0, 0], "left")
    kw = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": NEW, "min_new_tokens": NEW}
    kw["do_sample"] = False
    assert torch.equal(
        model.generate(**kw, adapter_names=[("p", "p"), "m2"], prompt_positions=[2, 1]),
        model.generate(**kw, adapter_names=[pm, "m2"], prompt_positions=[2, 1]),
    )


def test_classification_combination_uses_the_head_of_its_last_adapter_with_one():
    torch.manual_seed(0)
    model = wrap(
        build_model("SEQ_CLS", "gpt2"),
        PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=3, modules_to_save=[]),
        "domain",
    )
    model.add_adapter("task", PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=2))
    both = _combined(model, ["domain", "task"], "both")
    copies = model.heads["score"].copies
    with torch.no_grad():
        copies["task"].weight.normal_()
        copies[both].load_state_dict(copies["task"].state_dict())
    rows = _rows([5, 3, 4])
    ids, mask, _ = _pad(rows, [0, 0, 0], "left")
    with torch.no_grad():
        got = model(
            input_ids=ids, attention_mask=mask, adapter_names=[("domain", "task"), "task", BASE]
        ).logits
        want = model(input_ids=ids, attention_mask=mask, adapter_names=[both, "task", BASE]).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_training_one_prompt_of_a_combination_leaves_the_other_frozen():
    torch.manual_seed(0)
    model = wrap(
        build_model("CAUSAL_LM", "gpt2"),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prompt_tuning_init="SAMPLE_VOCAB"),
        "domain",
    )
    model.prompts["domain"].embedding.requires_grad_(False)  # e.g. loaded with trainable=False
    model.add_adapter("task", PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    both = _combined(model, ["domain", "task"], "both")
    model.train()
    rows = _rows([5, 3])
    ids, mask, _ = _pad(rows, [0, 0], "right")
    model(
        input_ids=ids, attention_mask=mask, labels=ids, adapter_names=[("domain", "task")] * 2
    ).loss.backward()
    assert model.prompts["domain"].embedding.grad is None
    task_grad = model.prompts["task"].embedding.grad.clone()
    assert task_grad.abs().sum() > 0
    model(input_ids=ids, attention_mask=mask, labels=ids, adapter_names=both).loss.backward()
    torch.testing.assert_close(task_grad, model.prompts[both].embedding.grad[3:], atol=1e-6, rtol=1e-4)
    assert model.prompts["domain"].embedding.grad is None


# ---------------------------------------------------------------------- errors
def test_bad_positions_are_clear_errors():
    model = _model("CAUSAL_LM", "gpt2")
    ids = _rows([4, 4])
    ids = torch.stack(ids)
    with pytest.raises(ValueError, match="prompt_position='MARKER'.*prompt_positions"):
        model(input_ids=ids, adapter_names="m")
    with pytest.raises(ValueError, match=r"must lie in 0\.\.4"):
        model(input_ids=ids, adapter_names="m", prompt_positions=[0, 5])
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        model(input_ids=ids, adapter_names="m", prompt_positions=[1])
    with pytest.raises(TypeError, match="integers"):
        model(input_ids=ids, adapter_names="m", prompt_positions=[1.0, 2.0])
    with pytest.raises(ValueError, match="Valid values are: PREFIX, MARKER"):
        PromptTuningConfig(num_virtual_tokens=2, prompt_position="middle")


# ---------------------------------------------------------------------- files
def test_marker_placement_is_saved_and_prefix_files_are_unchanged(tmp_path):
    model = _model("CAUSAL_LM", "llama")
    model.save_pretrained(tmp_path, selected_adapters=["m"])
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    assert data["prompt_position"] == "MARKER"
    again = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama"), tmp_path)
    assert again.peft_config["default"].prompt_position is PromptPosition.MARKER
    model.save_pretrained(tmp_path / "p", selected_adapters=["p"])
    assert "prompt_position" not in json.loads((tmp_path / "p" / "adapter_config.json").read_text())


def test_peft_reads_our_marker_file_as_a_prefix_and_its_files_stay_prefixes(tmp_path):
    peft = pytest.importorskip("peft")
    ours = _model("CAUSAL_LM", "llama")
    ours.save_pretrained(tmp_path / "m", selected_adapters=["m"])
    ids = _rows([6])[0].unsqueeze(0)
    with pytest.warns(UserWarning, match="prompt_position"):
        pm = peft.PeftModel.from_pretrained(build_model("CAUSAL_LM", "llama"), tmp_path / "m").eval()
    with torch.no_grad():
        got = pm(input_ids=ids).logits[:, 3:]  # PEFT returns the prompt columns too
        want = ours(input_ids=ids, adapter_names="m", prompt_positions=[0]).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # PEFT writes no placement: what it saves loads here as a prefix
    pm.save_pretrained(tmp_path / "peft")
    assert "prompt_position" not in json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    back = SoftPromptModel.from_pretrained(build_model("CAUSAL_LM", "llama"), tmp_path / "peft")
    assert back.peft_config["default"].prompt_position is PromptPosition.PREFIX
    with torch.no_grad():
        front = back(input_ids=ids).logits
        moved = back(input_ids=ids, prompt_positions=[3]).logits
    assert torch.equal(front, moved)
    torch.testing.assert_close(front, want, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- ensembles
@pytest.mark.parametrize("words", [{"pos": "good", "neg": "bad"}, {"pos": "very good", "neg": "so bad"}])
def test_ensemble_in_one_pass_equals_each_member_alone(words):
    model = _model("CAUSAL_LM", "llama")
    tok = make_tokenizer()
    verbalizer = Verbalizer.build(tok, words)
    texts = ["the movie was good", "", "awful plot and boring music", "fun"]
    templated = tokenize_template(tok, "review {text} {prompt} sentiment", texts)
    rows = [t.ids for t in templated]
    positions = [t.prompt_position for t in templated]
    members = ["m", "p", ("m", "m2")]
    calls = []
    handle = model.base_model.register_forward_pre_hook(lambda *a: calls.append(1))
    scores = ensemble_scores(model, rows, verbalizer, PAD, members, prompt_positions=positions, batch_size=8)
    handle.remove()
    assert len(calls) == 1, "one batched pass for all members"
    assert scores.members.shape == (3, len(texts), 2)
    with torch.no_grad():
        for k, member in enumerate(members):
            for i in range(len(rows)):
                alone = class_logits(
                    model, [rows[i]], verbalizer, PAD, [member], prompt_positions=[positions[i]]
                )
                torch.testing.assert_close(
                    scores.members[k, i], F.log_softmax(alone[0], -1), atol=ATOL, rtol=0
                )
    torch.testing.assert_close(scores.mean, scores.members.mean(0))
    assert torch.equal(scores.predictions(), scores.mean.argmax(1))


# ---------------------------------------------------------------------- templates
TOK = make_tokenizer()
_text = st.lists(st.sampled_from(WORDS + ["!", ",", "zzz"]), max_size=6).map(" ".join) | st.text(max_size=12)
_literal = st.text(alphabet=string.ascii_letters + " \n:.,", max_size=8)


def _tok(text):
    return TOK(text, add_special_tokens=False)["input_ids"] if text else []


@PROPERTY
@given(pieces=st.lists(_literal, min_size=3, max_size=3), prompt_first=st.booleans(), text=_text)
def test_template_ids_are_the_two_sides_tokenized_apart(pieces, prompt_first, text):
    a, b, c = pieces
    fields = ["{prompt}", "{text}"] if prompt_first else ["{text}", "{prompt}"]
    template = a + fields[0] + b + fields[1] + c
    (row,) = tokenize_template(TOK, template, [text])
    left, right = template.split("{prompt}")
    left_ids, right_ids = (_tok(side.replace("{text}", text)) for side in template.split("{prompt}"))
    assert row == Templated(left_ids + right_ids, len(left_ids))
    # The word-level tokenizer splits on whitespace and punctuation only, so when {prompt}
    # touches whitespace the ids are those of the whole template without the marker.
    if (not left or left[-1].isspace()) or (not right or right[0].isspace()):
        assert row.ids == _tok(template.replace("{prompt}", "").replace("{text}", text))


@PROPERTY
@given(
    texts=st.lists(_text, min_size=1, max_size=4),
    side=st.sampled_from(["left", "right"]),
    template=st.sampled_from(["review {text} {prompt} sentiment", "{prompt}review {text}", "{text}{prompt}"]),
)
def test_templated_batches_equal_rows_alone(texts, side, template):
    model = _property_model()
    rows = tokenize_template(TOK, template, texts)
    ids, mask, positions = pad_templated(rows, PAD, side=side)
    assert torch.equal(ids[mask.bool()], torch.tensor([i for r in rows for i in r.ids], dtype=torch.long))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_names="m", prompt_positions=positions).logits
        for i, r in enumerate(rows):
            if not r.ids:
                continue
            want, keep, _ = _by_hand(model, torch.tensor(r.ids), r.prompt_position, "m")
            torch.testing.assert_close(out[i][mask[i].bool()], want.logits[0, keep], atol=ATOL, rtol=0)


@functools.cache
def _property_model():
    return _model("CAUSAL_LM", "gpt2")


@pytest.mark.parametrize(
    "template,message",
    [
        ("review {text} sentiment", r"no \{prompt\} marker"),
        ("{prompt} review {prompt} {text}", r"2 \{prompt\} markers"),
        ("review {prompt} sentiment", r"no \{text\} marker"),
        ("{text} and {text} {prompt}", r"2 \{text\} markers"),
        ("{text} {prompt} {label}", r"the field \{label\}"),
        ("{text:>5} {prompt}", r"the field \{text:>5\}"),
        ("{text} {prompt} {", "not a valid format string"),
        ("{text} {prompt} }", "not a valid format string"),
    ],
)
def test_invalid_templates_name_the_problem(template, message):
    with pytest.raises(ValueError, match=message):
        parse_template(template)


@PROPERTY
@given(template=st.text(alphabet="{}abtexpromt :", max_size=24))
def test_any_template_parses_or_is_a_clear_value_error(template):
    try:
        left, right = parse_template(template)
    except ValueError as err:
        assert "template" in str(err)
        return
    assert template.count("{prompt}") >= 1
    assert (left + right).format(text="\x00").count("\x00") == 1
    (row,) = tokenize_template(TOK, template, ["good movie"])
    assert 0 <= row.prompt_position <= len(row.ids)


def test_escaped_braces_and_empty_text():
    left, right = parse_template("{{x}} {text} {prompt}")
    assert (left, right) == ("{{x}} {text} ", "")
    (row,) = tokenize_template(TOK, "{text}{prompt}", [""])
    assert row == Templated([], 0)
    (row,) = tokenize_template(TOK, "review {text} {prompt}", ["good " * 50], max_length=6)
    assert len(row.ids) <= 6 and row.prompt_position == len(row.ids)
