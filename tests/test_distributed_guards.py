"""Guards for multi-process training, each in 2 real processes under `torchrun` (gloo, CPU):
the prompt's gradient is summed over the ranks (not averaged: AdamW hardly notices a constant
factor, so the end-to-end equivalence tests cannot), each micro-batch's loss is divided by
the global number of micro-batches, and only rank 0 writes files.

The worker scripts are written to the test's temporary folder and started by torchrun with
`tests.test_distributed._env` (PYTHONPATH: the `src` next to these tests); the 1-process
reference step runs its script in the test's own process. Every run is bounded by a timeout."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sharded_support import two_rank_reports
from tests.test_distributed import SPLITS, TIMEOUT, _env, _train_args
from tests.tiny import review_workspace

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="torch.distributed with gloo is needed",
)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return review_workspace(tmp_path_factory.mktemp("dist-guards"), SPLITS)


# ---------------------------------------------------------------------- the gradient reduction
# Every value is a small integer times a power of two, so the sums (and the float32 <-> bfloat16
# round trips `reduce_gradients` makes) are exact on any CPU: the tests compare with torch.equal.
BASE = [[1.0, -2.0, 0.5, 4.0], [8.0, 0.25, -3.0, 16.0], [-0.125, 6.0, 2.0, -1.0]]
HEAD = [[1.0, 2.0], [-4.0, 0.5]]

REDUCE_SCRIPT = '''
"""Rank r gives the Trainer's reduction known gradients, (r + 1) x a fixed tensor; the reduced
values go to FOLDER/rank{r}.json."""
import json
import sys
from pathlib import Path

import torch

from softprompt.sharding import distributed

folder = Path(sys.argv[1])
base, head = torch.tensor(json.loads(sys.argv[2])), torch.tensor(json.loads(sys.argv[3]))
assert distributed.init("cpu") and distributed.world_size() == 2
rank = distributed.rank()
prompt = torch.nn.Parameter(torch.zeros_like(base))  # the prompt: float32
heads = torch.nn.Parameter(torch.zeros_like(head, dtype=torch.bfloat16))  # a head kept in bfloat16
unused = torch.nn.Parameter(torch.zeros(5))  # a gradient on rank 0 only (rank 1 adds zeros)
prompt.grad = (rank + 1) * base
heads.grad = ((rank + 1) * head).to(torch.bfloat16)
unused.grad = torch.arange(5.0) if rank == 0 else None
# the flags the Trainer sends along: its step loss, "stop requested", "diverged"
flags = distributed.reduce_gradients([prompt, heads, unused], [0.5 * (rank + 1), float(rank == 1), 0.0])
summed = distributed.all_reduce_sum((rank + 1) * base)
report = {
    "prompt": prompt.grad.tolist(),
    "prompt dtype": str(prompt.grad.dtype),
    "heads": heads.grad.float().tolist(),
    "heads dtype": str(heads.grad.dtype),
    "unused": unused.grad.tolist(),
    "flags": flags,
    "all_reduce_sum": summed.tolist(),
}
(folder / f"rank{rank}.json").write_text(json.dumps(report))
distributed.close()
'''


def test_the_prompt_and_head_gradients_are_summed_over_the_ranks_exactly(tmp_path):
    """`distributed.reduce_gradients` (what `Trainer.step` calls for the prompt's and the
    heads' gradients, with its flags) and `all_reduce_sum` under it: every rank ends with the
    sum, 3 x the tensor for ranks giving 1 x and 2 x (an average would give 1.5 x)."""
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE_SCRIPT)
    reports = two_rank_reports(str(script), tmp_path, json.dumps(BASE), json.dumps(HEAD), timeout=TIMEOUT)
    base, head = torch.tensor(BASE), torch.tensor(HEAD)
    for rank, report in enumerate(reports):
        assert torch.equal(torch.tensor(report["prompt"]), 3 * base), (rank, report["prompt"])
        assert report["prompt dtype"] == "torch.float32"
        assert torch.equal(torch.tensor(report["heads"]), 3 * head), (rank, report["heads"])
        assert report["heads dtype"] == "torch.bfloat16"
        assert torch.equal(torch.tensor(report["unused"]), torch.arange(5.0)), (rank, report["unused"])
        assert report["flags"] == [1.5, 1.0, 0.0], rank
        assert torch.equal(torch.tensor(report["all_reduce_sum"]), 3 * base), rank


# ---------------------------------------------------------------------- the loss normalisation
STEP_SCRIPT = '''
"""One optimizer step of the Trainer (2 micro-batches of 4), the gradient the optimizer is
given and the step's loss, to FOLDER/rank{r}.json (rank 0 in one process)."""
import json
import sys
from pathlib import Path

import torch

from softprompt.sharding import distributed
from softprompt.scoring.objectives import length_grouped_batches
from softprompt.training.trainer import TrainConfig, Trainer

folder, ws, grad_accum = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = TrainConfig(
    output_dir=str(folder / "run"), model=str(ws / "model"), data=str(ws / "train.jsonl"),
    dev_data=str(ws / "dev.jsonl"), batch_size=4, grad_accum=grad_accum, max_steps=1,
    num_virtual_tokens=4, lr=0.05, seed=3, device="cpu", bf16=False, zero_shot=False,
)
trainer = Trainer(config)
trainer.setup()
trainer.model.train()  # as `Trainer.fit` does before its steps
seen = []
trainer.state.optimizer.register_step_pre_hook(
    lambda opt, args, kwargs: seen.append([p.grad.clone() for p in trainer.params])
)
batches = length_grouped_batches(trainer.objective.lengths, config.batch_size, config.seed, 0)
loss = trainer.step(batches[: grad_accum * trainer.world])
report = {"world": trainer.world, "loss": loss, "grads": [g.tolist() for g in seen[0]]}
(folder / f"rank{distributed.rank()}.json").write_text(json.dumps(report))
distributed.close()
'''


def test_a_step_of_two_processes_gives_the_optimizer_the_gradient_of_one_process(ws, tmp_path, monkeypatch):
    """2 processes with grad_accum 1 against 1 process with grad_accum 2 (the same 2
    micro-batches): each micro-batch's loss is divided by the step's 2 micro-batches, not by
    this rank's 1, and the ranks' gradients are summed, so the optimizer gets the 1-process
    gradient (float sums in another order: allclose). Dividing by the rank's own count would
    double it; averaging over the ranks would halve it."""
    script = tmp_path / "step.py"
    script.write_text(STEP_SCRIPT)
    one = tmp_path / "one"
    one.mkdir()
    monkeypatch.setattr(sys, "argv", [str(script), str(one), str(ws), "2"])
    runpy.run_path(str(script), run_name="__main__")  # the reference: this process alone
    reference = json.loads((one / "rank0.json").read_text())
    assert reference["world"] == 1
    two = tmp_path / "two"
    two.mkdir()
    reports = two_rank_reports(str(script), two, str(ws), "1", timeout=TIMEOUT)
    want = [torch.tensor(g) for g in reference["grads"]]
    assert want and all(g.abs().sum() > 0 for g in want)
    for rank, report in enumerate(reports):
        assert report["world"] == 2
        got = [torch.tensor(g) for g in report["grads"]]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            ratio = float(g.norm() / w.norm())  # 2: the loss divided by the rank's count; 0.5: averaged
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=f"rank {rank}: norm ratio {ratio}")
        assert report["loss"] == pytest.approx(reference["loss"], rel=1e-5)


# ---------------------------------------------------------------------- who writes
AUDIT_SCRIPT = '''
"""`softprompt ARGS...` with every file-system change this process makes logged, with its
rank, to LOG_DIR/writes-rank{RANK}.jsonl (Python's audit events: opening a file for writing,
os.open with write flags, renames, mkdir, removals, temporary files and folders)."""
import json
import os
import sys

log_dir, argv = sys.argv[1], sys.argv[2:]
rank = os.environ.get("RANK", "?")
log = open(os.path.join(log_dir, f"writes-rank{rank}.jsonl"), "a", buffering=1, encoding="utf-8")
log.write(json.dumps({"event": "started", "rank": rank, "paths": []}) + "\\n")
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_EXCL
# event -> (how many leading path arguments, index of its dir_fd argument or None)
EVENTS = {
    "os.rename": (2, 2), "os.mkdir": (1, 2), "os.remove": (1, 1), "os.rmdir": (1, 1),
    "os.truncate": (1, None), "os.link": (2, 2), "os.symlink": (2, 2), "os.chmod": (1, 2),
    "os.utime": (1, 3), "shutil.rmtree": (1, 1), "shutil.copyfile": (2, None),
    "shutil.copytree": (2, None), "shutil.move": (2, None),
    "tempfile.mkstemp": (1, None), "tempfile.mkdtemp": (1, None),
}


def _paths(items, dir_fd):
    out = []
    for item in items:
        if isinstance(item, int):
            continue  # a file descriptor
        path = os.fsdecode(item)
        if not os.path.isabs(path) and dir_fd not in (None, -1):
            continue  # relative to an open folder (inside shutil.rmtree, logged itself)
        out.append(os.path.abspath(path))
    return out


def hook(event, args):
    try:
        if event == "open":
            path, flags = args[0], args[2]
            if isinstance(flags, int) and flags & WRITE_FLAGS:
                paths = _paths([path], None)
            else:
                return
        elif event in EVENTS:
            count, fd_at = EVENTS[event]
            dir_fd = args[fd_at] if fd_at is not None and len(args) > fd_at else None
            paths = _paths(args[:count], dir_fd)
        else:
            return
        if paths:
            log.write(json.dumps({"event": event, "rank": rank, "paths": paths}) + "\\n")
    except Exception:  # never break the program being watched
        pass


sys.addaudithook(hook)
from softprompt.cli import main

sys.exit(main(argv))
'''


def _writes_under(log: Path, root: Path) -> tuple[list[dict], list[tuple[str, str]]]:
    """The log's records, and (event, path relative to `root`) for each path under `root`."""
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    root = os.path.abspath(root)
    under = [
        (r["event"], os.path.relpath(p, root))
        for r in records
        for p in r["paths"]
        if p == root or p.startswith(root + os.sep)
    ]
    return records, under


def test_only_rank_0_writes_the_run_files(ws, tmp_path):
    """A real 2-process `softprompt train` (checkpoints every step, an evaluation, best/, last/,
    results, plot, metrics): every write under the output folder is rank 0's; rank 1, which
    computes every step alongside it, writes nothing there."""
    script = tmp_path / "audited_softprompt.py"
    script.write_text(AUDIT_SCRIPT)
    logs, out = tmp_path / "logs", tmp_path / "run"
    logs.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(script), str(logs), *_train_args(ws, out, steps=4)]  # fmt: skip
    done = subprocess.run(command, check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    (records0, writes0), (records1, writes1) = (
        _writes_under(logs / f"writes-rank{r}.jsonl", out) for r in (0, 1)
    )
    # both ranks ran under the audit hook
    assert records0[0] == {"event": "started", "rank": "0", "paths": []}
    assert records1[0] == {"event": "started", "rank": "1", "paths": []}
    assert writes1 == [], writes1[:20]
    # the hook sees every kind of write the run makes (else the check above proves nothing)
    touched = {path.split(os.sep)[0] for _, path in writes0}
    run_files = {
        "metrics.jsonl",
        "run_config.json",
        "results.json",
        "plot.png",
        "checkpoints",
        "best",
        "last",
    }
    assert run_files <= touched, sorted(touched)
    events = {event for event, path in writes0 if path.startswith("checkpoints")}
    assert {"tempfile.mkdtemp", "os.rename", "shutil.rmtree"} <= events, sorted(events)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
