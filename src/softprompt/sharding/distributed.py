"""Rank and world for a run started by `torchrun` or `accelerate launch`: the one place that
knows about several processes, so the training loop reads the same in one and in many.

Everything is torch.distributed: the process group is initialised from the environment the
launcher sets (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`), with the
gloo backend on CPU and nccl on CUDA. `torchrun` and `accelerate launch --multi_gpu` (torchrun's
launcher underneath, CPUs too) set those; `accelerate launch --cpu` with several processes has
`mpirun` start them, which sets its own rank variables instead (`PMI_RANK`/`PMI_SIZE` for MPICH
and Intel MPI, `OMPI_COMM_WORLD_*` for Open MPI, `MV2_COMM_WORLD_*` for MVAPICH), read when
`RANK`/`WORLD_SIZE` are absent, as accelerate itself does. Without any of them (or with a world
of 1) every function here is a no-op: `rank()` is 0, `is_main()` is True, reductions return
their input and `shard` returns all the indices.

A rank that dies or stops answering never makes the others hang: every collective runs
under the process group's timeout (`SOFTPROMPT_DIST_TIMEOUT` seconds, default 600), and
a failed collective is raised as `DistributedError`, which names the rank and the
operation, so the launcher sees a non-zero exit code.

With `--fsdp` the frozen model is sharded over the ranks by PyTorch's own FSDP
(`shard_model`), with `--zero3` by DeepSpeed ZeRO-3 (`softprompt.sharding.zero3`, which joins this
module's process group); then every forward pass is a collective, and `replicated()` makes
every rank do all of a piece of work (evaluation) instead of its share.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from softprompt.core.prefix import backbone
from softprompt.core.sharded_tensors import gathered, partitioned
from softprompt.devices import launch_env, launched

logger = logging.getLogger(__name__)

T = TypeVar("T")
TIMEOUT_ENV = "SOFTPROMPT_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0
_replicated = False  # inside `replicated()`: every rank does all of the work


class DistributedError(RuntimeError):
    """Another process of the run died or stopped answering; this one stops too."""


# (the variable torchrun sets, then those of MPICH/Intel MPI, Open MPI and MVAPICH: what
# `accelerate launch --cpu` gets from mpirun)
def accelerate_fsdp() -> bool:
    """Whether `accelerate launch --use_fsdp` (or an accelerate config that uses FSDP) started
    this process: it sets `ACCELERATE_USE_FSDP`. softprompt then shards with its own FSDP2
    (`shard_model`), as `--fsdp` does; accelerate's other FSDP settings are not read."""
    return os.environ.get("ACCELERATE_USE_FSDP", "").strip().lower() in ("1", "true", "yes")


def timeout_s() -> float:
    """Seconds a collective may wait for the other ranks before the run fails."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds; got {value!r}.") from None


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


def on_main(callback: Callable[..., None]) -> Callable[..., None]:
    """`callback` on rank 0, a function that does nothing on the other ranks (progress shows once)."""
    return callback if is_main() else (lambda *args, **kwargs: None)


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
        rank_, world, _ = launch_env()
        try:  # env://: MASTER_ADDR and MASTER_PORT (the rank and world may be MPI's, so passed here)
            dist.init_process_group(
                backend=backend, rank=rank_, world_size=world, timeout=datetime.timedelta(seconds=seconds)
            )
        except Exception as err:  # a missing rank, a wrong address: say so, never hang
            raise DistributedError(
                f"could not join the process group ({backend}, rank {rank_} of {world}, "
                f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}): {err}"
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
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process and inside
    `replicated()`, where every rank holds the same)."""
    if not active() or _replicated:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    _collective("all_gather_object", dist.all_gather_object, out, obj)
    return out


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th item from index rank (all in one process,
    and all inside `replicated()`)."""
    if _replicated:
        return list(items)
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


@contextlib.contextmanager
def replicated() -> Iterator[None]:
    """Every rank computes all of the work in the block instead of its share: `shard` gives
    every item and `gather_objects` this rank's own object, which is every rank's.

    For a model sharded with FSDP (`shard_model`) every forward pass is a collective (it
    gathers the weights), so the ranks must make the same calls: sharing out evaluation
    examples would give one rank fewer batches, or fewer generation steps, than another.
    """
    global _replicated
    previous, _replicated = _replicated, True
    try:
        yield
    finally:
        _replicated = previous


# ---------------------------------------------------------------------- FSDP
def _fsdp_units(base: torch.nn.Module) -> list[list[torch.nn.Module]]:
    """The groups of modules `shard_model` makes FSDP units of, innermost first: each
    transformer block, the input embeddings (with every other module holding their weight:
    the output embeddings when tied to them, else those on their own), then the transformer
    body."""
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks: list[torch.nn.Module] = []
    taken: list[str] = []
    for path, module in base.named_modules():
        if type(module).__name__ in names and not any(path.startswith(t + ".") for t in taken):
            blocks.append(module)
            taken.append(path)
    if not blocks:  # no `_no_split_modules`: the children of the body's longest ModuleList
        lists = [m for m in base.modules() if isinstance(m, torch.nn.ModuleList)]
        blocks = list(max(lists, key=len)) if lists else []
    units = [[b] for b in blocks]
    embed_in, embed_out = base.get_input_embeddings(), None
    getter = getattr(base, "get_output_embeddings", None)
    if callable(getter):
        embed_out = getter()
    in_weight = getattr(embed_in, "weight", None)
    # every module holding the input embeddings' weight (the output embeddings when tied; an
    # encoder-decoder's shared table, encoder and decoder embeddings): one unit, as FSDP needs
    sharing = [m for m in base.modules() if m is not embed_in and in_weight is not None
               and any(p is in_weight for p in m.parameters(recurse=False))]  # fmt: skip
    if embed_out is not None and embed_out not in sharing and embed_out is not embed_in:
        units.append([embed_out])
    units.append([embed_in, *sharing])
    body = backbone(base)
    # a body that only wraps another (OPT's `model.decoder`; OPTForCausalLM calls the decoder
    # itself, never the `model` around it): the inner one, whose forward runs
    while body is not base and len(list(body.children())) == 1 and not list(body.parameters(recurse=False)):
        body = next(body.children())
    if body is not base:
        units.append([body])
    return units


def shard_model(
    base: torch.nn.Module,
    device: torch.device,
    replicated_params: Iterable[torch.nn.Parameter] = (),
    *,
    weights_from_rank0: bool = False,
) -> bool:
    """Shard the frozen `base` over the ranks with PyTorch's FSDP (`fully_shard`, FSDP2).

    Every transformer block, the input embeddings and the body become units of their own
    (the input embeddings are called on their own, before the model, to embed the input),
    then `base` itself. Each rank keeps 1/world of every weight and gathers a unit's weights
    for its forward (and again for its backward). `replicated_params` (the prompt's heads:
    trained, so their gradients are all-reduced by hand like the prompt's) are left whole.
    A no-op in one process.

    With `weights_from_rank0` only rank 0 needs the weights: the other ranks may hold the
    model on the `meta` device (`base_models.load_model_on_rank0` builds it so, from rank 0's
    config, without reading the weight files). After sharding, rank 0's whole state dict is
    sent into every rank's shards, one tensor at a time (PyTorch's `set_model_state_dict`
    with `broadcast_from_rank0`), and so are the tensors a state dict leaves out (non-persistent
    buffers such as the rotary `inv_freq`, and plain tensor attributes): every rank ends with
    rank 0's values, bit for bit. Without it every rank must hold the same whole model.

    Returns:
        Whether the model was sharded.
    """
    if not active():
        return False
    from torch.distributed.device_mesh import (
        init_device_mesh,  # (torch < 2.6: FSDP2 lives elsewhere; only --fsdp needs it)
    )
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    ignored = set(replicated_params)
    # rank 0's whole weights, read after sharding: references, not copies (sharding copies each
    # rank's slice out of them, and moves the model to its device, so these stay where they were)
    whole = base.state_dict() if weights_from_rank0 and is_main() else {}
    for unit in _fsdp_units(base):
        fully_shard(unit if len(unit) > 1 else unit[0], mesh=mesh, ignored_params=ignored or None)
    fully_shard(base, mesh=mesh, ignored_params=ignored or None)
    if weights_from_rank0:
        _load_from_rank0(base, whole, device)
        del whole
    # FSDP takes the first unit that runs a forward as the root of all the others, and the
    # input embeddings run first in every call of a SoftPromptModel: one forward of `base`
    # itself (a collective, on every rank) makes it the root.
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    inputs: dict[str, Any] = {"input_ids": token}
    if getattr(base.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = token
    with torch.no_grad():
        _collective("FSDP's first forward", base, **inputs)
    logger.debug("rank %d: base model sharded over %d processes (FSDP)", rank(), world_size())
    return True


def _plain_tensors(base: torch.nn.Module) -> list[tuple[torch.nn.Module, str, str, torch.Tensor]]:
    """The tensors of `base` that a state dict leaves out, in module order: (module, its path,
    attribute name, tensor) for each non-persistent buffer and each plain tensor attribute."""
    out = []
    for path, module in base.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name in module._non_persistent_buffers_set:
                out.append((module, path, name, buffer))
        for name, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                out.append((module, path, name, value))
    return out


def _load_from_rank0(base: torch.nn.Module, whole: dict[str, torch.Tensor], device: torch.device) -> None:
    """Fill every rank's shards (and the tensors outside the state dict) of the sharded `base`
    with rank 0's values (`whole`: rank 0's state dict taken before sharding; empty elsewhere)."""
    # (as in `shard_model`: only --fsdp needs torch.distributed.checkpoint)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if not is_main():
        # room for this rank's shards (and the buffers) on its device, filled below; a model
        # already holding weights is overwritten with rank 0's all the same
        base.to_empty(device=device)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=True)
    _collective("sending rank 0's weights", set_model_state_dict, base, whole, options=options)
    # Non-persistent buffers and plain tensor attributes are computed in the model's
    # constructor (on the meta device here, so never computed): rank 0 sends its own. Its list
    # names them, so every rank makes the same broadcasts in the same order.
    mine = _plain_tensors(base)
    listing = [
        (path, name, tuple(t.shape), str(t.dtype), t.device.type == device.type) for _, path, name, t in mine
    ]
    listing = broadcast_object(listing)
    found = {(path, name): (module, tensor) for module, path, name, tensor in mine}
    for path, name, shape, dtype_name, on_device in listing:
        module, tensor = found.get((path, name), (None, None))
        if module is None or tuple(tensor.shape) != shape or str(tensor.dtype) != dtype_name:
            raise DistributedError(
                f"rank {rank()}: the model differs from rank 0's: {path or '(root)'}.{name} "
                f"{'missing' if module is None else f'{tuple(tensor.shape)} {tensor.dtype}'} here, "
                f"{shape} {dtype_name} on rank 0."
            )
        sent = tensor.to(device) if is_main() else torch.empty(shape, dtype=tensor.dtype, device=device)
        _collective("sending rank 0's buffers", dist.broadcast, sent, src=0)
        if not is_main():
            value = sent if on_device else sent.cpu()
            if name in module._buffers:
                module._buffers[name] = value
            else:
                setattr(module, name, value)
    # nothing of the model may stay on the meta device, on any rank (decided together: a rank
    # that stopped alone would leave the others waiting in the first forward)
    left = [n for n, p in base.named_parameters() if getattr(p, "_local_tensor", p).is_meta]
    left += [n for n, b in base.named_buffers() if b.is_meta]
    left += [f"{path}.{name}" for _, path, name, t in _plain_tensors(base) if t.is_meta]
    flag = all_reduce_sum(torch.tensor([float(bool(left))], device=device))
    if flag.item():
        raise DistributedError(
            f"rank {rank()}: after loading rank 0's weights, "
            + (
                f"{', '.join(left[:5])} are still on the meta device."
                if left
                else "another rank has tensors on the meta device."
            )
        )
    logger.debug("rank %d: rank 0's weights loaded into the shards", rank())


def _fsdp_unit(module: torch.nn.Module) -> bool:
    try:  # (torch < 2.6 has no FSDP2 here, and then nothing is an FSDP unit)
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover  (a torch without FSDP2)
        return False
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def gathered_input_embeddings(base: torch.nn.Module) -> Iterator[None]:
    """The whole input-embedding table on every rank for the block when `base` is sharded
    (a collective: every rank enters it); a no-op otherwise.

    Saving an adapter reads a few fixed rows of the table to fingerprint the base model; with
    FSDP those rows may live on another rank, and with DeepSpeed ZeRO-3 (`softprompt.sharding.zero3`)
    outside a forward pass the table is an empty placeholder on every rank.
    """
    embed = base.get_input_embeddings()
    if not _fsdp_unit(embed):
        weights = [p for p in embed.parameters() if partitioned(p)]
        if not weights or not active():
            yield
            return
        with contextlib.ExitStack() as stack:  # (the gather is the collective; partitioning again is not)
            _collective("gathering the input embeddings", stack.enter_context, gathered(weights))
            yield
        return
    _collective("gathering the input embeddings", embed.unshard)
    try:
        yield
    finally:
        embed.reshard()


__all__ = ["DistributedError", "accelerate_fsdp", "active", "all_reduce_mean", "all_reduce_sum", "barrier",
           "broadcast_object", "broadcast_parameters", "close", "gather_objects", "gathered_input_embeddings",
           "init", "is_main", "on_main", "rank", "reduce_gradients",
           "replicated", "shard", "shard_model", "timeout_s",
           "world_size"]  # fmt: skip
