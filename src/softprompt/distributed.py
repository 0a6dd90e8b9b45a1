"""Rank and world for a run started by `torchrun` or `accelerate launch`: the one place that
knows about several processes, so the training loop reads the same in one and in many.

Everything is torch.distributed: the process group is initialised from the environment the
launcher sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), with the
gloo backend on CPU and nccl on CUDA. Without those variables (or with `WORLD_SIZE=1`)
every function here is a no-op: `rank()` is 0, `is_main()` is True, reductions return
their input and `shard` returns all the indices.

A rank that dies or stops answering never makes the others hang: every collective runs
under the process group's timeout (`SOFTPROMPT_DIST_TIMEOUT` seconds, default 600), and
a failed collective is raised as `DistributedError`, which names the rank and the
operation, so the launcher sees a non-zero exit code.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "SOFTPROMPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class DistributedError(RuntimeError):
    """Another process of the run died or stopped answering; this one stops too."""


def launched() -> bool:
    """Whether a launcher started this process as one of several (`WORLD_SIZE` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def timeout_s() -> float:
    """Seconds a collective may wait for the other ranks before the run fails."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {value!r}.") from None


def local_rank() -> int:
    """This process's index on its machine (`LOCAL_RANK`; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def active() -> bool:
    """Whether collectives go to other processes (a process group of more than one)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the process that writes files and shows progress."""
    return rank() == 0


def init(device: torch.device | str | None = None) -> bool:
    """Join the launcher's process group (once); returns whether this run is distributed.

    Args:
        device: The device this rank computes on: nccl for CUDA, gloo otherwise.
    """
    if not launched():
        return False
    if not dist.is_available():
        raise DistributedError("WORLD_SIZE > 1 but this torch build has no torch.distributed.")
    if not dist.is_initialized():
        where = torch.device(device) if device is not None else torch.device("cpu")
        backend = "nccl" if where.type == "cuda" else "gloo"
        if where.type == "cuda" and where.index is not None:
            torch.cuda.set_device(where)  # nccl's object collectives and barriers use the current device
        seconds = timeout_s()
        try:
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=seconds))
        except Exception as err:  # a missing rank, a wrong address: say so, never hang
            raise DistributedError(
                f"could not join the process group ({backend}, rank {os.environ.get('RANK')} of "
                f"{os.environ.get('WORLD_SIZE')}, {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')}): {err}"
            ) from err
        logger.debug("rank %d of %d joined (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return active()


def close() -> None:
    """Leave the process group (at the end of a run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _failed(op: str, err: Exception) -> DistributedError:
    return DistributedError(
        f"rank {rank()} of {world_size()}: {op} failed; another process of the run died or stopped "
        f"answering within {timeout_s():g} s ({type(err).__name__}: {str(err).splitlines()[0][:300]}). "
        "The run stops; the newest complete checkpoint is kept: start it again with --resume."
    )


def _collective(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except DistributedError:
        raise
    except Exception as err:  # gloo/nccl raise RuntimeError (and subclasses) on a lost peer
        raise _failed(what, err) from err


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks, in place; returns it (unchanged in one process)."""
    if active():
        _collective("all_reduce", dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over ranks, in place; returns it."""
    if active():
        all_reduce_sum(tensor)
        tensor /= dist.get_world_size()
    return tensor


def reduce_gradients(params: Iterable[torch.nn.Parameter], flags: Sequence[float] = ()) -> list[float]:
    """Sum the gradients of `params` over ranks in one collective (a rank without a gradient
    adds zeros), together with `flags` (summed too, e.g. "stop requested"). Returns the
    summed flags. The parameters are the prompt's: a few kB, so one flat buffer is cheap.
    """
    params = list(params)
    if not active():
        return list(flags)
    pieces = [p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), device=p.device,
              dtype=p.dtype) for p in params]  # fmt: skip
    device = pieces[0].device if pieces else torch.device("cpu")
    flat = torch.cat([*(x.float() for x in pieces), torch.tensor(list(flags), dtype=torch.float32,
                                                                      device=device)])  # fmt: skip
    all_reduce_sum(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
        offset += n
    return flat[offset:].tolist()


def broadcast_parameters(params: Iterable[torch.nn.Parameter]) -> None:
    """Make every rank hold rank 0's values of `params`."""
    if active():
        with torch.no_grad():
            for p in params:
                _collective("broadcast", dist.broadcast, p.data, src=0)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank (picklable objects)."""
    if not active():
        return obj
    box = [obj]
    _collective("broadcast_object", dist.broadcast_object_list, box, src=0)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _collective("all_gather_object", dist.all_gather_object, out, obj)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item from index rank (all in one process)."""
    return list(items[rank() :: world_size()])


def barrier() -> None:
    """Wait for every rank, at most the timeout; gloo names the ranks that did not arrive."""
    if not active():
        return
    if dist.get_backend() == "gloo":
        seconds = datetime.timedelta(seconds=timeout_s())
        _collective("barrier", dist.monitored_barrier, timeout=seconds, wait_all_ranks=True)
    else:
        _collective("barrier", dist.barrier)


# ---------------------------------------------------------------------- device and dtype
DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(setting: str | None = "auto") -> torch.device:
    """`--device` as a torch.device: `auto` is this rank's GPU (`LOCAL_RANK`'s under a
    launcher) when there is one, then Apple's mps (one process only), else the CPU; `cuda`
    under a launcher is the local rank's GPU too."""
    value = (setting or "auto").strip().lower()
    if value == "auto":
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


__all__ = ["DistributedError", "active", "all_reduce_mean", "all_reduce_sum", "barrier", "broadcast_object",
           "broadcast_parameters", "close", "gather_objects", "init", "is_main", "launched", "local_rank",
           "rank", "reduce_gradients", "resolve_device", "resolve_dtype", "shard", "timeout_s",
           "world_size"]  # fmt: skip
