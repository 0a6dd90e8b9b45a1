"""Several processes, for real: `torchrun` (gloo, CPU) runs of a tiny model against 1-process
runs of the same global batch, resuming with another number of processes, and a rank that
dies. Every wait is bounded.

The equivalence tested (and documented in softprompt.training.trainer): N processes with
`--grad-accum G` take the same steps as 1 process with `--grad-accum G*N` (the same
micro-batches of `--batch-size` examples, in the same order, the same normalisation).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.sharded_support import F32_EPS, TINY_RUN_TERMS, float32_prompt_atol
from tests.tiny import build_model, make_tokenizer, review_rows, review_workspace, workspace_args

STEPS = 8
TIMEOUT = 240  # seconds any one run may take here (they take ~10-20 s)
DIST_TIMEOUT = "20"  # SOFTPROMPT_DIST_TIMEOUT: how long a rank waits for a dead peer
SPLITS = {"train": (64, 1), "dev": (13, 2), "test": (11, 3)}  # (examples, seed) of tests.tiny.review_rows
# Runs of other process counts take the same steps, their sums in other orders and kernels: the
# prompts agree to float32 rounding (see tests/sharded_support.py), the metrics exactly.
ATOL = float32_prompt_atol()
LOSS_RTOL = TINY_RUN_TERMS * F32_EPS

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return review_workspace(tmp_path_factory.mktemp("dist"), SPLITS)


def _train_args(ws: Path, out: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [
        "train",
        *workspace_args(ws),
        "--output", str(out),
        "--max-steps", str(steps),
        "--batch-size", "4",
        "--eval-every", "4",
        "--checkpoint-every", "1",
        "--keep-checkpoints", "2",
        "--num-virtual-tokens", "4",
        "--lr", "0.05",
        "--warmup-steps", "2",
        "--no-zero-shot",
        "--seed", "3",
        "--device", "cpu",
        *extra,
    ]  # fmt: skip


def _one(ws: Path, out: Path, *extra: str, **kw) -> list[str]:
    return [sys.executable, "-m", "softprompt", *_train_args(ws, out, *extra, **kw)]


def _torchrun(ws: Path, out: Path, *extra: str, n: int = 2, **kw) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "softprompt", *_train_args(ws, out, *extra, **kw)]  # fmt: skip


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "HF_HUB_OFFLINE": "1"})
    env["SOFTPROMPT_DIST_TIMEOUT"] = DIST_TIMEOUT
    env["PYTHONPATH"] = (
        str(Path(__file__).resolve().parent.parent / "src") + os.pathsep + env.get("PYTHONPATH", "")
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    return env


def _run(command: list[str]) -> subprocess.CompletedProcess:
    result = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _prompt(folder: Path) -> torch.Tensor:
    return load_file(folder / "adapter_model.safetensors")["prompt_embeddings"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _evals(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("dev_") or k == "step"} for r in _records(out)
            if r.get("event") == "eval"]  # fmt: skip


def _checkpoint_steps(out: Path) -> list[int]:
    root = out / "checkpoints"
    found = [p.name for p in root.iterdir()] if root.is_dir() else []
    return sorted(int(name.split("-")[1]) for name in found if name.startswith("step-"))


def _wait_for(condition, proc: subprocess.Popen, timeout: float = TIMEOUT) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module")
def one_process(ws):
    """The reference: one process, grad_accum 2 (the global batch of 2 processes x grad_accum 1)."""
    out = ws / "one-process"
    _run(_one(ws, out, "--grad-accum", "2"))
    return out


def test_two_processes_train_the_prompt_of_one_process_with_the_same_global_batch(ws, one_process):
    out = ws / "two-processes"
    result = _run(_torchrun(ws, out))
    torch.testing.assert_close(_prompt(out / "last"), _prompt(one_process / "last"), rtol=0, atol=ATOL)
    torch.testing.assert_close(_prompt(out / "best"), _prompt(one_process / "best"), rtol=0, atol=ATOL)
    # dev metrics reduced over the ranks (13 examples: 7 + 6) are the 1-process numbers, as are test scores
    assert _evals(out) == _evals(one_process) and len(_evals(out)) == 2
    assert [e["dev_examples"] for e in _evals(out)] == [13, 13]
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads((one_process / "results.json").read_text())
    assert results["tuned"]["examples"] == 11
    # rank 0 alone wrote the run and showed progress: one start and one end record, one line per eval
    records = _records(out)
    assert [r["event"] for r in records if "event" in r] == ["start", "eval", "eval", "end"]
    assert sum(r.get("loss") is not None for r in records) == 1  # log_every 10: the last step only
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in _records(one_process) if "loss" in r], rel=LOSS_RTOL)
    assert result.stderr.count("step 4: dev_accuracy") == 1, result.stderr[-3000:]
    info = json.loads((out / "run_config.json").read_text())
    assert info["resolved"]["world_size"] == 2 and info["resolved"]["device"] == "cpu"
    assert _checkpoint_steps(out) == [STEPS - 1, STEPS]


def _accelerate(ws: Path, out: Path, *launch: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", *launch, "--main_process_port",
            str(_free_port()), "-m", "softprompt", *_train_args(ws, out)]  # fmt: skip


def test_accelerate_launch_trains_the_prompt_of_one_process(ws, one_process, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts torchrun's launcher, on CPUs too
    (`--multi_gpu` only picks the launcher): the run is the 2-process torchrun run."""
    pytest.importorskip("accelerate")
    out = ws / "accelerate"
    # HF_HOME: no accelerate default_config.yaml of this machine's user in the way
    env = _env(HF_HOME=str(tmp_path / "hf"))
    command = _accelerate(ws, out, "--multi_gpu", "--num_processes", "2")
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["resolved"]["world_size"] == 2
    torch.testing.assert_close(_prompt(out / "last"), _prompt(one_process / "last"), rtol=0, atol=ATOL)
    assert _evals(out) == _evals(one_process)
    assert json.loads((out / "results.json").read_text()) == json.loads(
        (one_process / "results.json").read_text()
    )


def test_mpi_launch_variables_are_read(monkeypatch):
    """`accelerate launch --cpu --num_processes N` runs under mpirun, which sets its own variables
    (MPICH/Intel MPI: PMI_*, Open MPI: OMPI_COMM_WORLD_*); torchrun's RANK/WORLD_SIZE come first."""
    from softprompt import devices

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(key, raising=False)
    assert devices.launch_env() == (0, 1, 0) and not devices.launched()
    monkeypatch.setenv("PMI_RANK", "3")
    monkeypatch.setenv("PMI_SIZE", "4")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert devices.launch_env() == (3, 4, 1) and devices.launched() and devices.local_rank() == 1
    for key in ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    assert devices.launch_env() == (1, 2, 1)
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun's single process inside an MPI job: one process
    assert not devices.launched()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert devices.resolve_device("auto") == torch.device("cpu")


def test_two_ranks_started_with_mpi_variables_train_the_prompt_of_one_process(ws, one_process):
    """What `accelerate launch --cpu --num_processes 2 --mpirun_hostfile H` gives each process
    (mpiexec's PMI_* and accelerate's MASTER_ADDR/MASTER_PORT/ACCELERATE_USE_CPU, no RANK or
    WORLD_SIZE), set by hand: MPI is not installed here."""
    out = ws / "mpi-variables"
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(PMI_RANK=str(rank), PMI_SIZE="2", MPI_LOCALRANKID=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, ACCELERATE_USE_CPU="True")  # fmt: skip
        pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(_one(ws, out), env=env, **pipes))
    try:
        errs = [p.communicate(timeout=TIMEOUT)[1] for p in procs]
    finally:
        _kill_running(procs)
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
    assert json.loads((out / "run_config.json").read_text())["resolved"]["world_size"] == 2
    torch.testing.assert_close(_prompt(out / "last"), _prompt(one_process / "last"), rtol=0, atol=ATOL)
    assert _evals(out) == _evals(one_process)


# The test extra installs MPICH's wheel (its mpiexec lands next to the interpreter), Linux only.
VENV_BIN = str(Path(sys.executable).parent)
MPIEXEC = shutil.which("mpiexec", path=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))


@pytest.mark.skipif(MPIEXEC is None, reason="no MPI launcher (the test extra's mpich wheel is Linux only)")
def test_accelerate_launch_cpu_with_mpirun_trains_the_prompt_of_one_process(ws, one_process, tmp_path):
    """`accelerate launch --cpu --num_processes 2` has mpirun start the processes (MPICH's
    mpiexec from the test extra)."""
    pytest.importorskip("accelerate")
    out = ws / "accelerate-mpi"
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost:2\n")
    command = _accelerate(ws, out, "--cpu", "--num_processes", "2", "--mpirun_hostfile", str(hostfile))
    env = _env(HF_HOME=str(tmp_path / "hf"))
    env["PATH"] = str(Path(MPIEXEC).parent) + os.pathsep + env.get("PATH", "")
    result = subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "run_config.json").read_text())["resolved"]["world_size"] == 2
    torch.testing.assert_close(_prompt(out / "last"), _prompt(one_process / "last"), rtol=0, atol=ATOL)
    assert _evals(out) == _evals(one_process)


def test_two_processes_killed_then_resumed_with_one_process(ws, one_process):
    out = ws / "two-then-one"
    proc = subprocess.Popen(_torchrun(ws, out), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        assert _wait_for(lambda: any(s >= 3 for s in _checkpoint_steps(out)), proc), "no checkpoint came"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, at once
        proc.wait(timeout=60)
    assert not (out / "last").exists()
    newest = max(_checkpoint_steps(out))
    assert newest < STEPS
    # one process with grad_accum 1 would be another global batch: refused, with the fix
    wrong = subprocess.run(
        _one(ws, out, "--resume"), check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT
    )
    assert wrong.returncode != 0 and "resume with --grad-accum 2" in wrong.stderr, wrong.stderr[-2000:]
    result = _run(_one(ws, out, "--resume", "--grad-accum", "2"))
    assert "resuming from step-" in result.stderr
    torch.testing.assert_close(_prompt(out / "last"), _prompt(one_process / "last"), rtol=0, atol=ATOL)
    assert _evals(out) == _evals(one_process)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(ws: Path, out: Path, *extra: str) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of a 400-step run, started by hand with the env:// launch torchrun does
    (so each rank's own exit is observed); stderr piped, as text."""
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        procs.append(subprocess.Popen(_one(ws, out, *extra, steps=400), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    return procs


def _kill_running(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=60)


def test_a_dead_rank_stops_the_others_with_an_error_and_the_checkpoint_is_intact(ws):
    """The env:// launch torchrun does, by hand, so the surviving rank's own exit is observed."""
    from softprompt.sharding.distributed import DEFAULT_TIMEOUT_S
    from softprompt.training.checkpoints import load_latest

    assert float(DIST_TIMEOUT) * 10 <= TIMEOUT < DEFAULT_TIMEOUT_S
    out = ws / "dead-rank"
    procs = _two_ranks(ws, out)
    survivor, victim = procs
    try:
        assert _wait_for(lambda: any(s >= 3 for s in _checkpoint_steps(out)), survivor), "no checkpoint came"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=60)
        # It must stop on its own: a survivor that hung on the dead peer until the default
        # timeout (600 s) runs past this wait, which is 12 times SOFTPROMPT_DIST_TIMEOUT.
        try:
            _, err = survivor.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving rank still ran {TIMEOUT} s after its peer died")
    finally:
        _kill_running(procs)
    assert survivor.returncode not in (0, None), err[-2000:]
    assert "another process of the run died or stopped answering" in err, err[-2000:]
    assert f"within {DIST_TIMEOUT} s" in err, err[-2000:]  # under the timeout set for the run
    assert "--resume" in err and "Traceback" not in err, err[-2000:]
    assert not (out / "last").exists()
    newest = max(_checkpoint_steps(out))
    folder, state = load_latest(out / "checkpoints")
    assert folder.name == f"step-{newest:08d}" and state["position"]["step"] == newest
    assert torch.isfinite(_prompt(folder)).all()


def test_one_process_is_a_no_op():
    from softprompt.sharding import distributed

    assert not distributed.active() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.is_main() and distributed.shard([5, 6, 7]) == [5, 6, 7]
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and torch.equal(
        distributed.all_reduce_mean(t), torch.tensor([1.0, 2.0])
    )
    assert distributed.gather_objects("x") == ["x"] and distributed.broadcast_object(3) == 3
    assert distributed.reduce_gradients([], [1.0, 0.0]) == [1.0, 0.0]
    distributed.barrier()


def test_device_and_dtype_options(monkeypatch):
    from softprompt import devices
    from softprompt.settings import TrainConfig

    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert devices.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert devices.resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            devices.resolve_device("cuda:1")
    with pytest.raises(ValueError, match="device must be"):
        TrainConfig(output_dir="x", device="tpu")
    with pytest.raises(ValueError, match="dtype must be"):
        TrainConfig(output_dir="x", dtype="int8")
    assert TrainConfig(output_dir="x", device="CUDA:0").device == "cuda:0"


def test_ctrl_c_on_one_rank_stops_both_at_the_same_step_and_rank_0_saves_once(ws):
    out = ws / "interrupted"
    procs = _two_ranks(ws, out, "--checkpoint-every", "1000")
    try:
        metrics = out / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and "eval" in metrics.read_text(), procs[0]), "no eval came"
        procs[1].send_signal(signal.SIGINT)  # the other rank learns of it in the next all-reduce
        errs = [p.communicate(timeout=120)[1] for p in procs]
    finally:
        _kill_running(procs)
    assert [p.returncode for p in procs] == [130, 130], [e[-1500:] for e in errs]
    steps = {int(s) for e in errs for s in re.findall(r"interrupted at step (\d+)", e)}
    assert len(steps) == 1, errs  # both ranks stopped after the same step
    assert _checkpoint_steps(out) == sorted(steps), "one checkpoint, written once, at that step"
    assert "Traceback" not in errs[0] and "--resume" in errs[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_model_trains_a_float32_prompt(ws, tmp_path, dtype):
    from softprompt.training.trainer import TrainConfig, Trainer

    config = TrainConfig(
        output_dir=str(tmp_path / dtype),
        model=str(ws / "model"),
        data=str(ws / "train.jsonl"),
        dev_data=str(ws / "dev.jsonl"),
        max_steps=3,
        batch_size=4,
        eval_every=0,
        num_virtual_tokens=4,
        zero_shot=False,
        device="cpu",
        dtype=dtype,
    )
    trainer = Trainer(config)
    result = trainer.fit()
    assert next(trainer.model.base_model.parameters()).dtype == getattr(torch, dtype)
    assert trainer.model.prompts["default"].embedding.dtype == torch.float32
    state = trainer.state.optimizer.state_dict()["state"]
    assert all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    assert (trainer.scaler is not None) == (dtype == "float16")
    saved = torch.load(
        tmp_path / dtype / "checkpoints" / "step-00000003" / "trainer_state.pt", weights_only=True
    )
    assert ("scaler" in saved) == (dtype == "float16")  # a resumed float16 run keeps its loss scale
    assert result.steps == 3 and torch.isfinite(_prompt(tmp_path / dtype / "last")).all()
    assert json.loads((tmp_path / dtype / "run_config.json").read_text())["resolved"]["dtype"] == dtype


def _worker_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of `rank` (a child of `launcher` with RANK=rank), if any."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        if parent == launcher and f"RANK={rank}".encode() in env:
            return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker through /proc")
def test_torchrun_job_with_a_killed_rank_ends_non_zero_within_the_timeout(ws):
    out = ws / "torchrun-dead-rank"
    proc = subprocess.Popen(_torchrun(ws, out, steps=400), env=_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert _wait_for(lambda: any(s >= 2 for s in _checkpoint_steps(out)), proc), "no checkpoint came"
        victim = _worker_pid(proc.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=float(DIST_TIMEOUT) + 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode != 0
    assert "rank      : 1" in err or "another process of the run died" in err, err[-2000:]
    assert not (out / "last").exists() and max(_checkpoint_steps(out)) >= 2


def test_sharded_evaluation_gathers_the_1_process_metrics(monkeypatch):
    """Both objectives: predictions of two shards, gathered, score as one process does (the
    collectives replaced by what rank 1 would send)."""
    from softprompt import PromptTuningConfig, wrap
    from softprompt.scoring import objectives
    from softprompt.scoring.objectives import ClassificationObjective, GenerationObjective
    from softprompt.sharding import distributed

    tokenizer = make_tokenizer()
    rows = review_rows(11, 5)
    texts, labels = [r["text"] for r in rows], [r["label"] for r in rows]
    words = {"negative": " negative", "positive": " positive"}
    model = wrap(
        build_model("CAUSAL_LM", "llama", initializer_range=0.5), PromptTuningConfig(num_virtual_tokens=3)
    )
    built = [
        ClassificationObjective.build(tokenizer, texts, labels, "{text}", words, 64),
        GenerationObjective.build(tokenizer, texts, labels, "{text}", 64, max_new_tokens=2),
    ]
    indices = [0, 2, 3, 5, 6, 7, 8, 10]
    for objective in built:
        whole = objectives.evaluate(objective, model, indices, adapter="default")
        with monkeypatch.context() as m:
            m.setattr(distributed, "world_size", lambda: 2)
            m.setattr(distributed, "shard", lambda items: list(items)[0::2])

            def gather(mine, objective=objective):
                theirs = list(range(len(indices)))[1::2]
                return [mine, (theirs, objective.predict(model, [indices[p] for p in theirs], "default"))]

            m.setattr(distributed, "gather_objects", gather)
            assert objectives.evaluate(objective, model, indices, adapter="default") == whole
        assert whole["examples"] == len(indices)


def test_ctrl_c_on_torchrun_saves_once_on_rank_0(ws):
    """A terminal's Ctrl-C reaches torchrun, which passes SIGINT on to its workers."""
    out = ws / "torchrun-interrupted"
    command = _torchrun(ws, out, "--checkpoint-every", "1000", steps=400)
    proc = subprocess.Popen(command, env=_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        metrics = out / "metrics.jsonl"
        assert _wait_for(lambda: metrics.exists() and "eval" in metrics.read_text(), proc), "no eval came"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert proc.returncode != 0
    steps = _checkpoint_steps(out)
    assert len(steps) == 1 and 4 <= steps[0] < 400, (steps, err[-2000:])  # the interrupt's checkpoint only
    assert not (out / "last").exists()
