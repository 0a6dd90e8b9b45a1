"""Nothing lost: real processes killed with SIGKILL (also mid-checkpoint) or interrupted with
Ctrl-C resume to the bit-identical prompt of an uninterrupted run; a diverging run stops
with its last good checkpoint.

Bit for bit holds by construction, on any CPU: the resumed run and the reference are one
process each with one thread (`_env`), on the same machine, taking the same steps on the same
batches of the same shapes, from the same values (prompt, optimizer moments, RNG states and data
position restored exactly from the checkpoint's float32 tensors), so every kernel computes the
same sums in the same order. Nothing here compares runs of other process or thread counts."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.training.trainer import TrainConfig, TrainingDiverged, train
from tests.tiny import build_model, make_tokenizer, review_workspace, workspace_args

STEPS = 14


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return review_workspace(tmp_path_factory.mktemp("resume"), {"train": (96, 1), "dev": (12, 2)})


def _command(ws: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "softprompt",
        "train",
        *workspace_args(ws, ("train", "dev")),
        "--output",
        str(out),
        "--max-steps",
        str(STEPS),
        "--batch-size",
        "4",
        "--eval-every",
        "5",
        "--eval-samples",
        "none",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "2",
        "--num-virtual-tokens",
        "4",
        "--lr",
        "0.05",
        "--no-zero-shot",
        "--seed",
        "3",
        *extra,
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"})
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parent.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    )
    return env


def _final_prompt(out: Path) -> torch.Tensor:
    return load_file(out / "last" / "adapter_model.safetensors")["prompt_embeddings"]


@pytest.fixture(scope="module")
def reference(ws):
    out = ws / "reference"
    subprocess.run(_command(ws, out), check=True, env=_env(), capture_output=True)
    return _final_prompt(out)


def _kill_when(proc: subprocess.Popen, condition, timeout: float = 120.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.001)
    proc.wait()
    return False


RESUMING = re.compile(r"resuming from step-(\d{8}) \(step (\d+)\)")


def _resume(ws: Path, out: Path, expected_step: int | None = None) -> str:
    """Resume the run in `out`; it must continue from the newest complete checkpoint (or from
    `expected_step`), not start again from step 0. Returns the run's stderr."""
    newest = max(_checkpoint_steps(out), default=0)
    result = subprocess.run(
        _command(ws, out, "--resume"), check=False, env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = RESUMING.findall(result.stderr)
    assert len(found) == 1, f"no 'resuming from' message: {result.stderr[-2000:]}"
    folder_step, step = int(found[0][0]), int(found[0][1])
    want = newest if expected_step is None else expected_step
    assert want > 0 and folder_step == step == want, (found, want)
    # the resumed process evaluates only the steps after the checkpoint (every 5, and the last)
    evals = [int(s) for s in re.findall(r"^step (\d+): dev_", result.stderr, flags=re.MULTILINE)]
    assert evals == [s for s in range(1, STEPS + 1) if s > want and (s % 5 == 0 or s == STEPS)]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("event") == "start"] == [0], "one start record: not restarted"
    return result.stderr


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    return (
        sorted(int(p.name.split("-")[1]) for p in root.iterdir() if p.name.startswith("step-"))
        if root.is_dir()
        else []
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(ws, reference, seed):
    out = ws / f"killed-random-{seed}"
    target = random.Random(seed).randint(2, STEPS - 2)
    proc = subprocess.Popen(
        _command(ws, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert _kill_when(proc, lambda: any(s >= target for s in _checkpoint_steps(out)))
    assert not (out / "last").exists(), "the run was killed before it finished"
    _resume(ws, out)
    assert torch.equal(_final_prompt(out), reference)


def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(ws, reference):
    out = ws / "killed-mid-write"
    root = out / "checkpoints"
    proc = subprocess.Popen(
        _command(ws, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def writing() -> bool:  # a half-built checkpoint folder exists, after a few complete ones
        return (
            root.is_dir()
            and len(_checkpoint_steps(out)) >= 2
            and any(p.name.startswith(".tmp-") for p in root.iterdir())
        )

    assert _kill_when(proc, writing)
    _resume(ws, out)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir()), "leftovers are cleaned up"
    assert torch.equal(_final_prompt(out), reference)


def test_sigkill_twice_and_metrics_stay_consistent(ws, reference):
    out = ws / "killed-twice"
    for target in (3, 9):
        proc = subprocess.Popen(
            _command(ws, out, *(["--resume"] if target == 9 else [])),
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        assert _kill_when(proc, lambda t=target: any(s >= t for s in _checkpoint_steps(out)))
    _resume(ws, out)
    assert torch.equal(_final_prompt(out), reference)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["step"] for r in records if r.get("event") == "eval"]
    assert evals == sorted(set(evals)), "no step is reported twice after resuming"


def test_ctrl_c_saves_a_checkpoint_and_resumes(ws, reference):
    out = ws / "interrupted"
    proc = subprocess.Popen(
        _command(ws, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any(s >= 4 for s in _checkpoint_steps(out)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err and "Traceback" not in err
    _resume(ws, out)
    assert torch.equal(_final_prompt(out), reference)


@pytest.mark.parametrize("damage", ["truncated-state", "truncated-safetensors", "missing-state"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(ws, reference, damage):
    out = ws / f"damaged-{damage}"
    proc = subprocess.Popen(
        _command(ws, out), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    assert _kill_when(proc, lambda: any(s >= 6 for s in _checkpoint_steps(out)))
    steps = _checkpoint_steps(out)
    assert len(steps) >= 2
    newest = out / "checkpoints" / f"step-{steps[-1]:08d}"
    if damage == "truncated-state":
        state = newest / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "truncated-safetensors":
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:40])
    else:
        (newest / "trainer_state.pt").unlink()
    err = _resume(ws, out, expected_step=steps[-2])
    warning = re.search(
        r"checkpoint (\S+) is damaged: (.*); resuming from the older checkpoint (\S+) instead", err
    )
    assert warning, err[-2000:]
    assert Path(warning.group(1)) == newest
    assert Path(warning.group(3)).name == f"step-{steps[-2]:08d}"
    reason = warning.group(2)
    assert ("trainer_state.pt" in reason) if "state" in damage else ("adapter" in reason), reason
    assert torch.equal(_final_prompt(out), reference)


def test_a_programming_error_while_loading_a_checkpoint_propagates(tmp_path, monkeypatch):
    from softprompt.training import checkpoints as train_checkpoints

    (tmp_path / "step-00000003").mkdir()
    torch.save({"position": {"step": 3}}, tmp_path / "step-00000003" / "trainer_state.pt")

    def buggy(*args, **kwargs):
        raise TypeError("a bug, not a damaged file")

    monkeypatch.setattr(train_checkpoints.torch, "load", buggy)
    with pytest.raises(TypeError, match="a bug"):
        train_checkpoints.load_latest(tmp_path)


def test_nan_loss_stops_with_the_last_good_checkpoint(ws, monkeypatch):
    from softprompt.scoring.objectives import ClassificationObjective

    real_loss, calls = ClassificationObjective.loss, []

    def loss_that_breaks_at_step_6(self, model, indices):
        calls.append(1)
        value = real_loss(self, model, indices)
        return value * float("nan") if len(calls) >= 6 else value

    monkeypatch.setattr(ClassificationObjective, "loss", loss_that_breaks_at_step_6)
    out = ws / "diverged"
    config = TrainConfig(
        output_dir=str(out),
        model=str(ws / "model"),
        data=str(ws / "train.jsonl"),
        dev_data=str(ws / "dev.jsonl"),
        max_steps=STEPS,
        batch_size=4,
        eval_every=0,
        checkpoint_every=1,
        keep_checkpoints=3,
        num_virtual_tokens=4,
        lr=0.05,
        zero_shot=False,
    )
    with pytest.raises(
        TrainingDiverged, match=r"at step 6.*last good checkpoint is .*step-00000004.*lower one.*--lr"
    ):
        train(config)
    # step 5's state produced the NaN at step 6: its checkpoint is dropped, 3 and 4 are kept
    assert _checkpoint_steps(out) == [3, 4]
    good = load_file(out / "checkpoints" / "step-00000004" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.isfinite(good).all()


def test_cli_exit_code_for_a_diverged_run(ws, tmp_path):
    poisoned = tmp_path / "poisoned"
    model = build_model("CAUSAL_LM", "llama")
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))  # every softmax over the vocabulary is NaN
    model.save_pretrained(poisoned)
    make_tokenizer().save_pretrained(poisoned)
    command = _command(ws, tmp_path / "out")
    command[command.index("--model") + 1] = str(poisoned)
    result = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True)
    assert result.returncode == 3, result.stderr[-1000:]
    assert "the loss became nan at step 1" in result.stderr and "lower one" in result.stderr
    assert "Traceback" not in result.stderr
