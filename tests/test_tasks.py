"""Every task type on every tiny architecture: padded and mixed-adapter batches give, row
for row, what each example gives alone; outputs cover the user's tokens only."""

from __future__ import annotations

import pytest
import torch

from softprompt import PromptTuningConfig, wrap
from tests.tiny import PAD, TASK_ARCHS, VOCAB, build_model

ATOL = 1e-5
LENGTHS = [5, 3, 6]
ADAPTERS = ["a", "b", "a"]  # "a" has 4 virtual tokens, "b" 2


def _model(task: str, arch: str):
    base = build_model(task, arch)
    model = wrap(base, PromptTuningConfig(task_type=task, num_virtual_tokens=4), adapter_name="a")
    model.add_adapter(
        "b", PromptTuningConfig(task_type=task, num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB")
    )
    model.eval()
    return model


def _rows(seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, VOCAB, (n,), generator=g) for n in LENGTHS]


def _pad(rows: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _extra(task: str, batch: int) -> dict:
    if task == "SEQ_2_SEQ_LM":
        return {"decoder_input_ids": torch.tensor([[PAD, 7, 9, 11]] * batch)}
    return {}


def _per_token(task: str, out) -> torch.Tensor | None:
    """The per-token output the task returns (None for pooled tasks)."""
    if task in ("CAUSAL_LM", "TOKEN_CLS"):
        return out.logits
    if task == "QUESTION_ANS":
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    if task == "FEATURE_EXTRACTION":
        return out.last_hidden_state
    return None


def _pooled(task: str, out) -> torch.Tensor | None:
    if task == "SEQ_CLS":
        return out.logits
    if task == "SEQ_2_SEQ_LM":
        return out.logits  # decoder logits, (B, dec_len, V)
    return None


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("task,arch", TASK_ARCHS)
def test_padded_mixed_batch_equals_single_rows(task, arch, side):
    model = _model(task, arch)
    rows = _rows()
    ids, mask = _pad(rows, side)
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask, adapter_names=ADAPTERS, **_extra(task, len(rows)))
        singles = [
            model(input_ids=r.unsqueeze(0), adapter_names=[a], **_extra(task, 1))
            for r, a in zip(rows, ADAPTERS)
        ]
    width = ids.shape[1]
    for i, (r, single) in enumerate(zip(rows, singles)):
        tok = _per_token(task, batch)
        if tok is not None:
            assert tok.shape[1] == width, "per-token outputs must cover the user's columns only"
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            torch.testing.assert_close(tok[i, sl], _per_token(task, single)[0], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(_pooled(task, batch)[i], _pooled(task, single)[0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("task,arch", TASK_ARCHS)
def test_prompt_changes_the_output(task, arch):
    """Guards the test above: two different prompts must give different results."""
    model = _model(task, arch)
    ids = _rows()[0].unsqueeze(0)
    with torch.no_grad():
        a = model(input_ids=ids, adapter_names=["a"], **_extra(task, 1))
        b = model(input_ids=ids, adapter_names=["b"], **_extra(task, 1))
    ta, tb = (
        (_per_token(task, a), _per_token(task, b))
        if _per_token(task, a) is not None
        else (_pooled(task, a), _pooled(task, b))
    )
    assert (ta - tb).abs().max() > 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_summed_cross_entropy_equals_torch(dtype, monkeypatch):
    """The loss's own cross-entropy (blockwise, no full log-probability tensor) gives
    PyTorch's value and gradient, ignored targets included."""
    from softprompt.core.losses import SummedCrossEntropy

    monkeypatch.setattr(
        SummedCrossEntropy, "BLOCK_BYTES", 4 * 37 * 3
    )  # 3 rows a block: 4 blocks, the last partial
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(11, 37, generator=g) * 4).to(dtype).requires_grad_()
    targets = torch.randint(0, 37, (11,), generator=g)
    targets[[0, 4, 10]] = -100
    ours = SummedCrossEntropy.apply(logits, targets)
    (grad_ours,) = torch.autograd.grad(ours * 0.7, logits)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    want = torch.nn.functional.cross_entropy(logits.to(work), targets, ignore_index=-100, reduction="sum")
    (grad_want,) = torch.autograd.grad(want * 0.7, logits)
    assert ours.dtype == work and grad_ours.dtype == dtype
    torch.testing.assert_close(ours, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        grad_ours, grad_want, rtol=1e-5, atol=1e-6 if dtype != torch.bfloat16 else 1e-2
    )
    assert grad_ours[[0, 4, 10]].abs().sum() == 0
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(
            lambda x: SummedCrossEntropy.apply(x, targets), (logits.detach().requires_grad_(),)
        )
    none = torch.full((11,), -100)  # every target ignored: zero loss and gradient, no NaN
    assert SummedCrossEntropy.apply(logits, none).item() == 0


def _by_hand(model, base, row: torch.Tensor, name: str):
    """The bare base model fed the prompt's embeddings in front of the user's tokens (one row,
    no padding): its per-token outputs at the user's columns, `(len(row), ...)`."""
    prompt = model.get_prompt(name)  # (N, hidden)
    embeds = torch.cat([prompt, base.get_input_embeddings()(row)]).unsqueeze(0)
    out = base(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    n = prompt.shape[0]
    if hasattr(out, "start_logits"):
        return out.start_logits[0, n:], out.end_logits[0, n:]
    return out.logits[0, n:]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("task,arch", [(t, a) for t, a in TASK_ARCHS if t in ("TOKEN_CLS", "QUESTION_ANS")])
def test_labels_and_positions_index_the_user_s_tokens(task, arch, side):
    """TOKEN_CLS labels and QA start/end positions, checked against a loss computed by hand
    from the bare model's outputs on the user's columns (the prompt in front, by hand)."""
    import torch.nn.functional as F

    model = _model(task, arch)
    base = model.base_model
    rows = _rows(seed=4)
    ids, mask = _pad(rows, side)
    width = ids.shape[1]
    cols = [slice(width - len(r), width) if side == "left" else slice(0, len(r)) for r in rows]
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        hand = [_by_hand(model, base, r, a) for r, a in zip(rows, ADAPTERS)]
        if task == "TOKEN_CLS":
            labels = torch.full(ids.shape, -100)
            per_row = [torch.randint(0, 3, (len(r),), generator=g) for r in rows]
            per_row[1][0] = -100  # an ignored token
            for i, c in enumerate(cols):
                labels[i, c] = per_row[i]
            out = model(input_ids=ids, attention_mask=mask, adapter_names=ADAPTERS, labels=labels)
            logits = torch.cat(hand)  # (real tokens, 3)
            want = F.cross_entropy(logits, torch.cat(per_row), ignore_index=-100)
            for i, c in enumerate(cols):
                torch.testing.assert_close(out.logits[i, c], hand[i], atol=ATOL, rtol=0)
        else:
            # token k of each row: the last token of rows 0 and 2, the first of row 1 ...
            start_k, end_k = [4, 0, 5], [4, 2, 3]
            # ... given as a column of the padded input, as for the bare model
            start = torch.tensor([c.start + k for c, k in zip(cols, start_k)])
            end = torch.tensor([c.start + k for c, k in zip(cols, end_k)])
            out = model(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=ADAPTERS,
                start_positions=start,
                end_positions=end,
            )
            # the softmax runs over each row's real user tokens only
            starts = torch.stack([F.cross_entropy(h[0], torch.tensor(k)) for h, k in zip(hand, start_k)])
            ends = torch.stack([F.cross_entropy(h[1], torch.tensor(k)) for h, k in zip(hand, end_k)])
            want = (starts.mean() + ends.mean()) / 2
            for i, c in enumerate(cols):
                torch.testing.assert_close(out.start_logits[i, c], hand[i][0], atol=ATOL, rtol=0)
                torch.testing.assert_close(out.end_logits[i, c], hand[i][1], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", [a for t, a in TASK_ARCHS if t == "QUESTION_ANS"])
def test_qa_answer_on_a_padding_token_is_a_clear_error(arch):
    """An answer position on a padded column would give an infinite loss (padding is out of
    the softmax); it is refused naming the row, while out-of-range positions stay ignored."""
    model = _model("QUESTION_ANS", arch)
    ids, mask = _pad(_rows(), "right")  # row 1 (3 tokens) is padded at columns 3..5
    fine = model(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([0, 2, 5]),
                 end_positions=torch.tensor([1, 99, 5]))  # fmt: skip
    assert torch.isfinite(fine.loss)
    with pytest.raises(ValueError, match=r"start_positions\[1\] = 4 points at a padding token of row 1"):
        model(input_ids=ids, attention_mask=mask, start_positions=torch.tensor([0, 4, 5]),
              end_positions=torch.tensor([1, 2, 5]))  # fmt: skip
