"""Helpers for the server tests (no tests here): a tiny model folder with adapters, and a
real `softprompt serve` subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.tiny import build_model, make_tokenizer

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}review{% endif %}"
)
TEMPLATE = "classify this review {text} sentiment"
LABEL_WORDS = {"positive": "good", "negative": "bad", "neutral": "so"}
ADAPTERS = {"sst": 4, "qa": 7, "third": 2}


def build_served_folder(root: Path, arch: str = "llama") -> tuple[Path, Path]:
    """A tiny base model folder and a folder of adapters (sst, qa, third); sst has a run_config."""
    from softprompt import PromptTuningConfig, SoftPromptModel

    model_dir, adapters_dir = root / "model", root / "adapters"
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    base = build_model("CAUSAL_LM", arch, seed=1)
    base.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    for i, (name, tokens) in enumerate(ADAPTERS.items()):
        torch.manual_seed(10 + i)
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)
        model = SoftPromptModel(build_model("CAUSAL_LM", arch, seed=1), cfg, name, trainable=False)
        with torch.no_grad():
            model.prompts[name].embedding.normal_(0, 2.0)
        model.save_pretrained(adapters_dir / name, selected_adapters=[name])
    run = {
        "config": {"model": str(model_dir), "max_length": 64},
        "resolved": {"task": "classification", "template": TEMPLATE, "label_words": LABEL_WORDS},
    }
    (adapters_dir / "sst" / "run_config.json").write_text(json.dumps(run), encoding="utf-8")
    return model_dir, adapters_dir


def load_library(model_dir: Path, adapters_dir: Path, names=tuple(ADAPTERS), dtype=None):
    """The same model and adapters loaded through the library, for reference results."""
    from softprompt import SoftPromptModel
    from softprompt.base_models import load_model

    base, tok = load_model(str(model_dir), dtype=dtype)
    first, *rest = names
    model = SoftPromptModel.from_pretrained(base, adapters_dir / first, adapter_name=first)
    for n in rest:
        model.load_adapter(adapters_dir / n, n)
    return model.eval(), tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m softprompt serve ...` in a subprocess; `stop()` always ends it."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
        self._fh = open(log, "wb")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "softprompt", "serve", "--port", str(self.port), *args],
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    def wait_ready(self, timeout: float = 90.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        if not self._fh.closed:
            self._fh.flush()
        return self.log.read_text(errors="replace")[-4000:]

    def terminate(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._fh.close()
