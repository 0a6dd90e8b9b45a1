"""DeepSpeed ZeRO-3 for real: `torchrun` and `accelerate launch --use_deepspeed` (gloo, CPU) runs
that partition a tiny model over 2 processes, against the 1-process run of the same global
batch; prompt initialisation and adapters from a partitioned embedding table; which launch
settings turn ZeRO-3 on. Every wait is bounded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from softprompt import sharding
from softprompt.sharding import distributed, zero3
from tests.sharded_support import (
    FLOAT32_15_BATCHES,
    assert_same_training,
    float32_prompt_atol,
    two_rank_reports,
)
from tests.test_distributed import (
    _env,
    _evals,
    _free_port,
    _prompt,
    _records,
    _run,
    _torchrun,
    _train_args,
)
from tests.test_fsdp import TIMEOUT

gloo = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


@pytest.fixture(scope="module")
def ws(sharded_ws):
    """The tiny model and data of tests/test_distributed.py (DeepSpeed needed from here on)."""
    pytest.importorskip("deepspeed")
    return sharded_ws


@pytest.fixture(scope="module")
def reference(ws, sharded_reference):
    """One process, float32, grad_accum 2: the global batch of 2 processes (shared with FSDP's tests)."""
    return sharded_reference


def _same_run(out: Path, reference: Path) -> None:
    """The run in `out` ended as the 1-process `reference` (as under FSDP, the training passes
    take the uncached prompt path: see test_fsdp.py): sharded_support.assert_same_training."""
    assert_same_training(out, reference)
    assert _records(out)[0]["train_examples"] == 60  # 15 batches: rank 1 makes a stand-in pass


def _loads_in_one_process(ws: Path, adapter: Path) -> None:
    """The adapter holds the whole prompt and the whole model's fingerprint: it loads (the
    fingerprint checked) into the model read by one process."""
    from softprompt import SoftPromptModel
    from softprompt.base_models import load_model
    from softprompt.core.adapter_files import META_BASE, base_fingerprint

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as fh:
        saved = json.loads(fh.metadata()[META_BASE])
    base, _ = load_model(ws / "model")
    assert saved == base_fingerprint(base)
    model = SoftPromptModel.from_pretrained(base, adapter)
    assert torch.equal(model.prompts["default"].embedding.detach(), _prompt(adapter))
    assert model.prompts["default"].embedding.shape == (4, 32)


@gloo
def test_zero3_over_two_processes_trains_the_prompt_of_one_process(ws, reference):
    out = ws / "zero3"
    result = _run(_torchrun(ws, out, "--zero3", *FLOAT32_15_BATCHES))
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    assert resolved["zero3"] is True and resolved["fsdp"] is False and resolved["world_size"] == 2
    assert "sharding the model over 2 processes (DeepSpeed ZeRO-3)" in result.stderr
    # DeepSpeed's shared-memory op (g++, ~40 s) is not built: ZeRO-3 never uses it
    assert "built successfully" not in result.stdout + result.stderr
    _same_run(out, reference)
    _loads_in_one_process(ws, out / "best")


@gloo
def test_accelerate_launch_with_deepspeed_zero_3_needs_no_softprompt_flag(ws, reference, tmp_path):
    """`accelerate launch --use_deepspeed --zero_stage 3` (torchrun's launcher underneath, CPUs
    too): softprompt reads the ZeRO stage from accelerate's environment."""
    out = ws / "accelerate"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--zero_stage", "3",
               "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
               "no", "--main_process_port", str(_free_port()), "-m", "softprompt",
               *_train_args(ws, out, *FLOAT32_15_BATCHES)]  # fmt: skip
    env = _env(HF_HOME=str(tmp_path / "hf"))  # no accelerate config of this machine's user
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = json.loads((out / "run_config.json").read_text())["resolved"]
    assert resolved["zero3"] is True and resolved["world_size"] == 2
    _same_run(out, reference)


@gloo
def test_a_generation_task_decodes_the_same_under_zero3(ws):
    """Dev metrics of a generation task (transformers' generate on every process, the decoding
    loop a collective) and the prompt: those of one process."""
    from tests.tiny import review_rows

    for name, (n, seed) in {"gen-train": (30, 1), "gen-dev": (7, 2)}.items():
        rows = [{"text": r["text"], "target": f" {r['label']} movie"} for r in review_rows(n, seed)]
        (ws / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--model", str(ws / "model"), "--data", str(ws / "gen-train.jsonl"), "--dev-data",
            str(ws / "gen-dev.jsonl"), "--max-steps", "6", "--batch-size", "4", "--eval-every", "3",
            "--num-virtual-tokens", "4", "--lr", "0.05", "--no-zero-shot", "--seed", "3", "--device", "cpu",
            "--no-bf16", "--max-new-tokens", "4"]  # fmt: skip
    reference, out = ws / "gen-reference", ws / "gen-zero3"
    _run([sys.executable, "-m", "softprompt", *args, "--output", str(reference), "--grad-accum", "2"])
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
          "softprompt", *args, "--output", str(out), "--zero3"])  # fmt: skip
    atol = float32_prompt_atol(steps=6)  # the sums of the classification runs, 6 steps
    torch.testing.assert_close(_prompt(out / "last"), _prompt(reference / "last"), rtol=0, atol=atol)
    assert _evals(out) == _evals(reference) and len(_evals(out)) == 2
    assert json.loads((out / "results.json").read_text()) == json.loads(
        (reference / "results.json").read_text()
    )
    assert any(e["dev_f1"] > 0 for e in _evals(out))  # something was decoded right


# ---------------------------------------------------------------------- a partitioned model
def _worker(root: Path) -> None:
    """One rank of `test_a_partitioned_model_initialises_and_computes_as_the_whole_one`."""
    from softprompt.base_models import load_model
    from softprompt.core.adapter_files import base_fingerprint
    from softprompt.sharding import distributed
    from tests.sharded_support import (
        PASS_POSITIONS,
        pass_report,
        prompts_of_every_init,
        training_and_evaluation_passes,
    )
    from tests.tiny import VOCAB, make_tokenizer

    distributed.init("cpu")
    rank = distributed.rank()
    tokenizer = make_tokenizer()
    report: dict[str, object] = {}
    # the whole models first: from_pretrained partitions what it loads while a ZeRO-3 config lives
    wholes = {tied: load_model(root / f"model-{tied}")[0] for tied in (False, True)}
    for tied, whole in wholes.items():
        key = f"tied={tied}"
        sharded = zero3.load_partitioned(str(root / f"model-{tied}"), zero3.Plan("test"), torch.float32,
                                         torch.device("cpu"), 2)  # fmt: skip
        zero3.attach(sharded)
        base = sharded.base
        weight = base.get_input_embeddings().weight
        report[f"{key} shapes"] = [list(weight.shape), list(weight.ds_shape)]
        report[f"{key} local fraction"] = sum(p.ds_tensor.numel() for p in base.parameters()) / sum(
            p.numel() for p in whole.parameters()
        )
        report[f"{key} tied"] = base.get_output_embeddings().weight is weight
        # initialised from the partitioned table; a training pass (the uncached prompt, as the
        # trainer takes it under ZeRO-3) and an evaluation pass (the cached prompt KV)
        models = prompts_of_every_init((whole, base), tokenizer, report, key)
        grads, logits = training_and_evaluation_passes(models, rank, VOCAB)
        # (ZeRO-3 computes linear layers with its own autograd function, on gathered weights: the
        # gradient and logits to float32 rounding, the predictions exactly)
        pass_report(grads, logits, PASS_POSITIONS, report, key)
        report[f"{key} frozen weights without gradients"] = all(p.grad is None for p in base.parameters())
        report[f"{key} fingerprint outside a gather"] = base_fingerprint(base)
        with distributed.gathered_input_embeddings(base):
            report[f"{key} fingerprint bit-identical"] = base_fingerprint(base) == base_fingerprint(whole)
            if distributed.is_main():
                models[1].save_pretrained(root / f"adapter-{tied}", selected_adapters=["TEXT"])
        report[f"{key} weights partitioned again"] = list(weight.shape)
        distributed.barrier()
    (root / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.close()


@gloo
def test_a_partitioned_model_initialises_and_computes_as_the_whole_one(tmp_path):
    """Two processes each hold half of every weight (an empty placeholder outside a forward pass);
    TEXT, CLASS_LABELS, SAMPLE_VOCAB and RANDOM read the partitioned table as the whole one, bit
    for bit; a training pass's gradient and an evaluation pass's logits equal the whole model's to
    float32 rounding (1e-6 of gradients up to 2.4 here), its predictions exactly; the adapter saved
    holds the whole prompt and the whole model's fingerprint and loads into a one-process model."""
    pytest.importorskip("deepspeed")
    from softprompt import SoftPromptModel
    from tests.tiny import VOCAB, build_model, make_tokenizer

    for tied in (False, True):
        build_model("CAUSAL_LM", "llama", initializer_range=0.5, tie_word_embeddings=tied).save_pretrained(
            tmp_path / f"model-{tied}"
        )
        make_tokenizer().save_pretrained(tmp_path / f"model-{tied}")
    for report in two_rank_reports(str(Path(__file__)), tmp_path, timeout=TIMEOUT):
        for tied in (False, True):
            key = f"tied={tied}"
            assert report[f"{key} shapes"] == [[0], [VOCAB, 32]]
            assert report[f"{key} local fraction"] == pytest.approx(0.5, abs=0.01)
            assert report[f"{key} tied"] is tied
            assert report[f"{key} frozen weights without gradients"] is True
            if not tied:  # (a table shared with the output layer may stay gathered after a pass)
                assert report[f"{key} fingerprint outside a gather"] is None
            assert report[f"{key} weights partitioned again"] == [0]
        checks = {
            k: v for k, v in report.items() if ("bit-identical" in k or "rounding" in k or "predictions" in k)
        }
        assert len(checks) == 2 * (6 + 3) and all(checks.values()), checks
    for tied in (False, True):
        base = build_model("CAUSAL_LM", "llama", initializer_range=0.5, tie_word_embeddings=tied)
        model = SoftPromptModel.from_pretrained(base, tmp_path / f"adapter-{tied}")
        assert model.prompts["default"].embedding.shape == (6, 32)


# ---------------------------------------------------------------------- what turns ZeRO-3 on
ACCELERATE_VARS = (zero3.USE_ENV, zero3.STAGE_ENV, zero3.CONFIG_FILE_ENV, zero3.OFFLOAD_PARAM_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ACCELERATE_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_zero3_comes_from_the_flag_or_accelerates_deepspeed_stage_3(clean_env, tmp_path):
    assert zero3.plan(False) is None
    assert zero3.plan(True).zero == zero3.DEFAULT_ZERO
    clean_env.setenv(zero3.USE_ENV, "true")  # accelerate's own default stage is 2: plain data parallel
    assert zero3.plan(False) is None
    clean_env.setenv(zero3.STAGE_ENV, "2")
    assert zero3.plan(False) is None
    clean_env.setenv(zero3.STAGE_ENV, "3")
    chosen = zero3.plan(False)
    assert chosen.source == "accelerate launch --use_deepspeed" and chosen.zero == zero3.DEFAULT_ZERO
    clean_env.setattr(distributed, "active", lambda: True)  # (sharding needs several processes)
    with pytest.raises(
        sharding.ShardingError, match="--fsdp and accelerate launch --use_deepspeed --zero_stage"
    ):
        sharding.choose(True, False, torch.device("cpu"), torch.float32)
    clean_env.setenv(zero3.OFFLOAD_PARAM_ENV, "cpu")
    assert zero3.plan(False).zero["offload_param"] == {"device": "cpu"}
    # a DeepSpeed config file: its stage and zero_optimization settings, "auto" left to softprompt
    clean_env.delenv(zero3.STAGE_ENV)
    clean_env.delenv(zero3.OFFLOAD_PARAM_ENV)
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto",
                                                        "stage3_max_live_parameters": 1000}}))  # fmt: skip
    clean_env.setenv(zero3.CONFIG_FILE_ENV, str(config))
    zero = zero3.plan(False).zero
    assert zero["stage3_max_live_parameters"] == 1000 and zero["stage3_prefetch_bucket_size"] == 0
    config.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert zero3.plan(False) is None
    clean_env.setenv(zero3.STAGE_ENV, "three")
    with pytest.raises(zero3.Zero3Error, match="ZeRO stage"):
        zero3.plan(False)


def test_the_deepspeed_config_follows_the_weights_dtype():
    config = zero3.ds_config(zero3.Plan("--zero3"), torch.bfloat16, 4)
    assert config["bf16"] == {"enabled": True} and config["fp16"] == {"enabled": False}
    assert config["train_batch_size"] == 4 and config["zero_optimization"]["stage"] == 3
    assert zero3.ds_config(zero3.Plan("--zero3"), torch.float16, 2)["fp16"] == {"enabled": True}


def test_without_deepspeed_zero3_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(zero3.Zero3Error, match=r"pip install 'softprompt\[deepspeed\]'"):
        zero3.load_partitioned("x", zero3.Plan("--zero3"), torch.float32, torch.device("cpu"), 2)


def test_fsdp_and_zero3_together_are_refused(tmp_path):
    """One check (`sharding.choose`), before the run touches its folder, in one process too."""
    from softprompt.settings import TrainConfig
    from softprompt.training.trainer import train

    with pytest.raises(
        ValueError, match="--fsdp and --zero3 are two ways to shard the frozen model; choose one"
    ):
        sharding.choose(True, True, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="choose one"):
        train(TrainConfig(output_dir=str(tmp_path / "run"), fsdp=True, zero3=True))
    assert not (tmp_path / "run").exists()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
