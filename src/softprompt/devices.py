"""Where and in what precision a process computes: the launch environment it was started in
(`torchrun`, `accelerate launch`, `mpirun`), `--device` and `--dtype`.

A leaf module: it reads the environment and asks torch what hardware there is, and imports
nothing of softprompt, so the single-process command line and server choose their device
without importing the multi-process machinery (`softprompt.sharding.distributed`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

_RANK_VARS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LOCAL_RANK_VARS = (
    "LOCAL_RANK",
    "MPI_LOCALRANKID",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MV2_COMM_WORLD_LOCAL_RANK",
)


def _env_int(names: Sequence[str], default: int) -> int:
    """The first of `names` set in the environment, as an int."""
    for name in names:
        value = os.environ.get(name, "").strip()
        if value:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"{name} must be an integer; got {value!r}.") from None
    return default


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them: torchrun's `RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, else an MPI launcher's (see the module docstring); (0, 1, 0) without one."""
    return _env_int(_RANK_VARS, 0), _env_int(_WORLD_VARS, 1), _env_int(_LOCAL_RANK_VARS, 0)


def launched() -> bool:
    """Whether a launcher started this process as one of several (a world size > 1)."""
    return launch_env()[1] > 1


def local_rank() -> int:
    """This process's index on its machine (`LOCAL_RANK` or MPI's; 0 in one process)."""
    return launch_env()[2]


DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str | None = "auto") -> torch.device:
    """`--device` as a torch.device: `auto` is this rank's GPU (`LOCAL_RANK`'s under a
    launcher) when there is one, then Apple's mps (one process only), else the CPU (always
    the CPU under `accelerate launch --cpu`); `cuda` under a launcher is the local rank's GPU too."""
    value = (setting or "auto").strip().lower()
    if value == "auto":
        if _accelerate_cpu():  # `accelerate launch --cpu`
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available() and not launched():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(value)
    except RuntimeError:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {setting!r}.") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {setting!r}.")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {setting!r}: this machine (or this torch build) has no CUDA GPU.")
        if device.index is None:
            device = torch.device("cuda", local_rank() % torch.cuda.device_count())
        elif device.index >= torch.cuda.device_count():
            raise ValueError(f"device {setting!r}: only {torch.cuda.device_count()} CUDA GPU(s) here.")
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError(f"device {setting!r}: mps is not available on this machine.")
    return device


def _accelerate_cpu() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")


def resolve_dtype(setting: str | None, device: torch.device) -> torch.dtype:
    """`--dtype` for the frozen weights: `auto` is bfloat16 on a GPU that computes it, float16
    on an older GPU, float32 on the CPU and mps (the CPU's bf16 is autocast, see `--bf16`)."""
    value = (setting or "auto").strip().lower()
    if value == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if value not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {setting!r}.")
    return DTYPES[value]


__all__ = ["DEVICES", "DTYPES", "launch_env", "launched", "local_rank", "resolve_device", "resolve_dtype"]
