"""FSDP for real: `torchrun` (gloo, CPU) runs that shard a tiny model over 2 processes with
PyTorch's `fully_shard`, against the 1-process run of the same global batch, and prompt
initialisation that reads a sharded embedding table. Every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sharded_support import (
    FLOAT32_15_BATCHES,
    assert_same_training,
    same_to_float32_rounding,
    two_rank_reports,
)
from tests.test_distributed import _env, _one, _records, _run, _torchrun

TIMEOUT = 240

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


@pytest.fixture(scope="module")
def ws(sharded_ws):
    """The tiny model and data of tests/test_distributed.py (conftest's, shared with ZeRO-3's tests)."""
    return sharded_ws


@pytest.fixture(scope="module")
def reference(sharded_reference):
    """The 1-process run of the same global batch, float32 (conftest's, shared with ZeRO-3's tests)."""
    return sharded_reference


def test_fsdp_over_two_processes_trains_the_prompt_of_one_process(ws, reference):
    """float32 (--no-bf16): under bfloat16 autocast the two paths agree to bfloat16's precision only."""
    out = ws / "fsdp"
    result = _run(_torchrun(ws, out, "--fsdp", *FLOAT32_15_BATCHES))
    info = json.loads((out / "run_config.json").read_text())
    assert info["resolved"]["fsdp"] is True and info["resolved"]["world_size"] == 2
    assert "sharding the model over 2 processes (FSDP)" in result.stderr
    assert _records(out)[0]["train_examples"] == 60  # 15 batches: the last step has one
    # Under FSDP a training pass feeds the prompt as embeddings where one process starts from the
    # prompt's cached KV (see Trainer._prompt_cache): the same sums in another order, equal to
    # float32 rounding (see sharded_support.assert_same_training).
    assert_same_training(out, reference)


def test_accelerate_launch_use_fsdp_shards_with_no_softprompt_flag(ws, reference, tmp_path):
    """`accelerate launch --use_fsdp --num_processes 2` (torchrun's launcher, on CPUs too) sets
    ACCELERATE_USE_FSDP: the run is sharded as with --fsdp and ends with the 1-process prompt."""
    pytest.importorskip("accelerate")
    from tests.test_distributed import _accelerate

    out = ws / "accelerate-fsdp"
    command = _accelerate(ws, out, "--use_fsdp", "--num_processes", "2")
    command += list(FLOAT32_15_BATCHES)
    env = _env(HF_HOME=str(tmp_path / "hf"))  # no accelerate config of this machine's user in the way
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((out / "run_config.json").read_text())
    assert info["resolved"]["fsdp"] is True and info["resolved"]["world_size"] == 2
    assert "sharding the model over 2 processes (FSDP)" in result.stderr
    assert_same_training(out, reference, folders=("last",))


def test_fsdp_on_the_uncached_prompt_path_trains_the_prompt_of_one_process(ws):
    """With --gradient-checkpointing one process also feeds the prompt as embeddings (no cached
    KV), so the runs differ only by FSDP and the 2-process sums. Not bit for bit: the ranks'
    products run on weights gathered into FSDP's buffers, and on an AVX2 EPYC MKL rounds some of
    them differently from the whole model's (the prompts 5.4e-7 apart, the metrics equal)."""
    reference = ws / "checkpointed-reference"
    _run(_one(ws, reference, "--grad-accum", "2", "--gradient-checkpointing", *FLOAT32_15_BATCHES))
    out = ws / "checkpointed-fsdp"
    _run(_torchrun(ws, out, "--fsdp", "--gradient-checkpointing", *FLOAT32_15_BATCHES))
    assert_same_training(out, reference)


def _worker(out: Path) -> None:
    """One rank of `test_a_sharded_model_initialises_and_computes_as_the_whole_one` (run by torchrun)."""
    from torch.distributed.tensor import DTensor

    from softprompt import PromptTuningConfig, SoftPromptModel
    from softprompt.sharding import distributed
    from tests.sharded_support import (
        PASS_POSITIONS,
        pass_report,
        prompts_of_every_init,
        training_and_evaluation_passes,
    )
    from tests.tiny import VOCAB, build_model, make_tokenizer

    distributed.init("cpu")
    rank = distributed.rank()
    tokenizer = make_tokenizer()
    report: dict[str, object] = {}
    for tied in (False, True):
        whole = build_model("CAUSAL_LM", "llama", initializer_range=0.5, tie_word_embeddings=tied)
        sharded = build_model("CAUSAL_LM", "llama", initializer_range=0.5, tie_word_embeddings=tied)
        if tied:
            sharded.tie_weights()
            whole.tie_weights()
            assert sharded.get_output_embeddings().weight is sharded.get_input_embeddings().weight
        for p in sharded.parameters():
            p.requires_grad_(False)
        assert distributed.shard_model(sharded, torch.device("cpu"))
        weight = sharded.get_input_embeddings().weight
        key = f"tied={tied}"
        local = sum(p.to_local().numel() for p in sharded.parameters())
        report[f"{key} local fraction"] = local / sum(p.numel() for p in whole.parameters())
        report[f"{key} sharded rows"] = [type(weight).__name__, isinstance(weight, DTensor) and
                                         weight.to_local().shape[0], VOCAB]  # fmt: skip
        # initialised from the sharded table; training and evaluation: the whole model's numbers
        models = prompts_of_every_init((whole, sharded), tokenizer, report, key)
        grads, logits = training_and_evaluation_passes(models, rank, VOCAB)
        pass_report(grads, logits, PASS_POSITIONS, report, key)
        report[f"{key} frozen weights without gradients"] = all(p.grad is None for p in sharded.parameters())
        # the tokenizer's ids all lie in rank 0's half of the table: rank 1 reads them from rank 0
        with distributed.gathered_input_embeddings(sharded):
            if distributed.is_main():
                models[1].save_pretrained(out / f"adapter-{tied}", selected_adapters=["TEXT"])
        distributed.barrier()
    # a table sharded inside a larger unit cannot be gathered on its own: a clear error, not wrong rows
    from torch.distributed.fsdp import fully_shard

    coarse = build_model("CAUSAL_LM", "llama", initializer_range=0.5)
    fully_shard(coarse)
    try:
        SoftPromptModel(coarse, PromptTuningConfig(num_virtual_tokens=2, prompt_tuning_init="SAMPLE_VOCAB"))
        report["coarse"] = "no error"
    except TypeError as err:
        report["coarse"] = str(err)
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.close()


def test_a_sharded_model_initialises_and_computes_as_the_whole_one(tmp_path):
    reports = two_rank_reports(str(Path(__file__)), tmp_path, timeout=TIMEOUT)
    from softprompt import SoftPromptModel
    from tests.tiny import VOCAB, build_model

    for report in reports:
        for tied in (False, True):
            assert report[f"tied={tied} sharded rows"] == ["DTensor", VOCAB // 2, VOCAB]
            assert report[f"tied={tied} local fraction"] == 0.5  # each rank holds half of every weight
            assert report[f"tied={tied} frozen weights without gradients"] is True
        # the prompts read from the table (copies of rows, or the same reduction over the same
        # gathered rows) bit for bit; the passes to float32 rounding, their predictions exactly
        checks = {
            k: v for k, v in report.items() if ("bit-identical" in k or "rounding" in k or "predictions" in k)
        }
        assert len(checks) == 2 * (5 + 3) and all(checks.values()), checks
        assert "sharded inside a larger FSDP unit" in report["coarse"], report["coarse"]
    # rank 0 saved the whole prompt; it loads into a plain one-process model of the same base
    for tied in (False, True):
        base = build_model("CAUSAL_LM", "llama", initializer_range=0.5, tie_word_embeddings=tied)
        model = SoftPromptModel.from_pretrained(base, tmp_path / f"adapter-{tied}")
        assert model.prompts["default"].embedding.shape == (6, 32)


# ---------------------------------------------------------------------- weights read on rank 0 only
# (task, architecture, extra config) of the saved models: every tiny architecture that generates
RANK0_CASES = [
    ("CAUSAL_LM", "llama", {}),
    ("CAUSAL_LM", "llama", {"tie_word_embeddings": True}),
    ("CAUSAL_LM", "gpt2", {}),
    ("CAUSAL_LM", "qwen2", {}),
    ("CAUSAL_LM", "opt", {}),
    ("CAUSAL_LM", "gpt_neox", {}),
    ("SEQ_2_SEQ_LM", "t5", {}),
    ("SEQ_2_SEQ_LM", "bart", {}),
]


def _rank0_worker(root: Path) -> None:
    """One rank of `test_only_rank_0_reads_the_weights` (run by torchrun): rank 0 loads each model
    folder; rank 1 is given a copy whose weights file is garbage, so reading it would fail."""
    from softprompt.base_models import ModelLoadError, load_model
    from softprompt.sharding import distributed, load_model_on_rank0
    from tests.tiny import VOCAB

    distributed.init("cpu")
    rank = distributed.rank()
    report: dict[str, object] = {}
    for i, (task, arch, _) in enumerate(RANK0_CASES):
        key = f"{i} {arch}"
        folder = root / (f"model-{i}" if rank == 0 else f"broken-{i}")
        base, tokenizer = load_model_on_rank0(folder, task_type=task)
        tensors = [*base.parameters(), *base.buffers()]
        report[f"{key} weights on meta before sharding"] = all(t.is_meta for t in tensors)
        report[f"{key} tokenizer"] = tokenizer("good movie")["input_ids"]
        for p in base.parameters():
            p.requires_grad_(False)
        assert distributed.shard_model(base, torch.device("cpu"), weights_from_rank0=True)
        # the reference: the whole model, read from the intact folder by every rank (after the fact)
        whole, _ = load_model(root / f"model-{i}", task_type=task)
        out_in = base.get_output_embeddings(), base.get_input_embeddings()
        report[f"{key} tied"] = out_in[0] is not None and out_in[0].weight is out_in[1].weight
        report[f"{key} tied in the whole model"] = (
            whole.get_output_embeddings() is not None
            and whole.get_output_embeddings().weight is whole.get_input_embeddings().weight
        )
        reference = dict(whole.named_parameters())
        # (a weight of the root unit only, outside every other, stays gathered after a forward)
        report[f"{key} weights bit-identical"] = all(
            torch.equal(p.full_tensor() if hasattr(p, "full_tensor") else p, reference[n])
            and p.dtype == reference[n].dtype
            for n, p in base.named_parameters()
        ) and set(reference) == {n for n, _ in base.named_parameters()}
        # every buffer and tensor attribute: rank 0's, and the whole model's
        extras = {f"{path}.{name}": t for _, path, name, t in distributed._plain_tensors(base)}
        extras.update({f"buffer {n}": b for n, b in base.named_buffers()})
        rank0 = distributed.broadcast_object(extras)
        report[f"{key} buffers"] = sorted(extras)
        report[f"{key} buffers equal rank 0's"] = rank0.keys() == extras.keys() and all(
            torch.equal(rank0[k], t) and rank0[k].dtype == t.dtype for k, t in extras.items()
        )
        whole_buffers = dict(whole.named_buffers())
        report[f"{key} buffers equal the whole model's"] = all(
            torch.equal(b, whole_buffers[n]) for n, b in base.named_buffers()
        ) and whole_buffers.keys() == {n for n, _ in base.named_buffers()}
        ids = torch.randint(4, VOCAB, (2, 6), generator=torch.Generator().manual_seed(rank))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if task == "SEQ_2_SEQ_LM":
            inputs["decoder_input_ids"] = ids[:, :3]
        with torch.no_grad():
            logits = [m(**inputs).logits for m in (whole, base)]
        report[f"{key} logits to float32 rounding"] = same_to_float32_rounding(
            logits[1], logits[0], ids.numel()
        )
        report[f"{key} predictions equal"] = bool(torch.equal(logits[1].argmax(-1), logits[0].argmax(-1)))
        report[f"{key} generation config"] = (
            base.generation_config.to_dict() == whole.generation_config.to_dict()
        )
    # rank 0 cannot load: every rank stops with its error, none waits
    try:
        load_model_on_rank0(root / "missing" if rank == 0 else root / "model-0")
        report["error"] = "no error"
    except ModelLoadError as err:
        report["error"] = str(err)
    (root / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.close()


def test_only_rank_0_reads_the_weights(tmp_path):
    """Rank 0 loads each model; rank 1 builds it on the meta device from rank 0's config and never
    reads its weights file (it is given one of garbage bytes); after sharding every rank holds rank
    0's weights and buffers bit for bit, and the sharded model computes the whole model's logits to
    float32 rounding (its products run on weights gathered into other buffers) and its predictions."""
    from tests.tiny import build_model, make_tokenizer

    for i, (task, arch, extra) in enumerate(RANK0_CASES):
        folder = tmp_path / f"model-{i}"
        model = build_model(task, arch, seed=i, initializer_range=0.5, **extra)
        model.save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        broken = tmp_path / f"broken-{i}"
        broken.mkdir()
        for file in folder.iterdir():
            data = file.read_bytes()
            if file.suffix == ".safetensors":  # the same size, unreadable
                data = bytes(b ^ 0x5A for b in data)
            (broken / file.name).write_bytes(data)
    reports = two_rank_reports(str(Path(__file__)), tmp_path, "rank0", timeout=TIMEOUT)
    for i, (_, arch, extra) in enumerate(RANK0_CASES):
        key = f"{i} {arch}"
        assert reports[0][f"{key} weights on meta before sharding"] is False
        assert reports[1][f"{key} weights on meta before sharding"] is True  # False with every rank loading
        assert reports[1][f"{key} tokenizer"] == reports[0][f"{key} tokenizer"]
        for report in reports:
            checks = {k: v for k, v in report.items() if k.startswith(f"{key} ") and isinstance(v, bool)}
            checks.pop(f"{key} weights on meta before sharding")
            assert checks.pop(f"{key} tied") == checks.pop(f"{key} tied in the whole model")
            assert len(checks) == 6 and all(checks.values()), (report is reports[1], checks)
    assert reports[0]["1 llama tied"] is True and reports[0]["0 llama tied"] is False
    assert "model.rotary_emb.inv_freq" in reports[1]["0 llama buffers"]  # non-persistent, sent by rank 0
    assert "does not exist" in reports[0]["error"]
    assert (
        reports[1]["error"].startswith("(rank 0) ModelLoadError") and "does not exist" in reports[1]["error"]
    )


if __name__ == "__main__":
    if sys.argv[2:] == ["rank0"]:
        _rank0_worker(Path(sys.argv[1]))
    else:
        _worker(Path(sys.argv[1]))
