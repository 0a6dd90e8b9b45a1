"""A plain run imports no optional engine it does not use: DeepSpeed, installed with the test
extra, logs "Setting accelerator to CPU" when imported on a machine without a GPU, so a run
that imports it on a path that does not use it shows the user a warning about nothing.

Each check runs in a fresh interpreter: the test process itself may have imported DeepSpeed
for the ZeRO-3 tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_distributed import _env
from tests.tiny import build_model, review_workspace, workspace_args

TIMEOUT = 240
DEEPSPEED_LINE = "Setting accelerator to CPU"

# Runs `softprompt.cli.main(argv)` and prints, last, which optional engines ended up imported.
_RUN_CLI = """
import json, sys
from softprompt.cli import main
code = main(sys.argv[1:])
engines = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in ("deepspeed", "vllm")})
print("ENGINES " + json.dumps(engines), flush=True)
sys.exit(code)
"""


def _cli(*argv: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    result = subprocess.run(
        [sys.executable, "-c", _RUN_CLI, *argv],
        check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    last = [line for line in result.stdout.splitlines() if line.startswith("ENGINES ")]
    assert last, result.stdout[-2000:]
    return result, json.loads(last[-1].removeprefix("ENGINES "))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return review_workspace(
        tmp_path_factory.mktemp("quiet"), {"train": (16, 1), "dev": (8, 2), "test": (8, 3)}
    )


def test_deepspeed_is_installed_here_so_the_checks_below_can_fail():
    import importlib.util

    assert importlib.util.find_spec("deepspeed") is not None, "the test extra installs deepspeed"


def test_plain_train_generate_and_inspect_import_no_optional_engine(ws, tmp_path):
    out = tmp_path / "run"
    train, engines = _cli(
        "train", *workspace_args(ws), "--output", str(out), "--max-steps", "2", "--batch-size", "4",
        "--num-virtual-tokens", "3", "--no-zero-shot", "--device", "cpu",
    )  # fmt: skip
    assert engines == [] and DEEPSPEED_LINE not in train.stdout + train.stderr, train.stdout[-2000:]
    assert (out / "best" / "adapter_model.safetensors").is_file()  # the run did its work
    for argv in (
        ("generate", "--model", str(ws / "model"), "--adapter", str(out / "best"), "--max-new-tokens", "2",
         "the movie was"),
        ("inspect", str(out / "best"), "--model", str(ws / "model")),
    ):  # fmt: skip
        result, engines = _cli(*argv)
        assert engines == [] and DEEPSPEED_LINE not in result.stdout + result.stderr, (argv, result.stdout)


_WRITE = """
import sys, torch
from pathlib import Path
from softprompt.base_models import write_pretrained
sys.path.insert(0, sys.argv[2])
from tests.tiny import build_model
tied = sys.argv[3] == "tied"
arch = "llama" if tied else "gpt2"
model = build_model("CAUSAL_LM", arch, seed=4, tie_word_embeddings=tied)
write_pretrained(model, Path(sys.argv[1]))
print("DEEPSPEED", any(m.split(".")[0] == "deepspeed" for m in sys.modules), flush=True)
"""


@pytest.mark.parametrize("tied", ["tied", "untied"])
def test_the_default_models_conversion_writes_a_loadable_folder_without_deepspeed(tmp_path, tied):
    """`base_models.write_pretrained`, which writes the converted default model: the folder names its
    architecture (as save_pretrained writes it), loads
    with `from_pretrained` to the same weights (a tied embedding stored once and tied again) and
    the same logits, and writing it imported no DeepSpeed (`save_pretrained` does, through
    accelerate's unwrapping, whenever DeepSpeed is installed)."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "model"
    root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", _WRITE, str(folder), root, tied],
        check=False, env=_env(), capture_output=True, text=True, timeout=TIMEOUT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEEPSPEED False" in result.stdout and DEEPSPEED_LINE not in result.stdout + result.stderr
    arch = "llama" if tied == "tied" else "gpt2"
    want = build_model("CAUSAL_LM", arch, seed=4, tie_word_embeddings=tied == "tied")
    saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert saved["architectures"] == [type(want).__name__]  # what transformers serve and vLLM read
    got = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert (got.get_output_embeddings().weight is got.get_input_embeddings().weight) == (tied == "tied")
    theirs = want.state_dict()
    assert got.state_dict().keys() == theirs.keys()
    assert all(torch.equal(t, theirs[k]) for k, t in got.state_dict().items())
    ids = torch.randint(4, 60, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(got(input_ids=ids).logits, want(input_ids=ids).logits)  # same process, same kernel
