"""How a training run spreads over processes: one `Strategy`, chosen once when the run is
prepared (`choose`), held by the run (`runs.Run.strategy`) and called by the `Trainer`,
which does not branch on it (as litgpt's loop calls its Fabric strategy).

- `Strategy` itself: one process, or plain data parallel under `torchrun` / `accelerate launch`
  (each process holds the whole frozen model; micro-batches are shared out and the
  prompt's gradient is summed by hand).
- `Fsdp`: `--fsdp` (or `accelerate launch --use_fsdp`): PyTorch's FSDP2 shards the frozen
  model; rank 0 reads the weights and the others build the model on the meta device.
- `Zero3`: `--zero3` (or `accelerate launch --use_deepspeed --zero_stage 3`): DeepSpeed
  partitions the frozen model as it is loaded.

A strategy says how the base is loaded (`load`) and wrapped (`shard`, `place_prompt`), how
the embedding table is read whole (`full_embeddings`), which passes a step makes
(`passes`) and how a training pass feeds the prompt (`training_pass`), how evaluation is
split (`evaluation`), how gradients and flags are reduced (`reduce`), and who writes
(`main`). The collectives themselves are `softprompt.sharding.distributed`'s.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch

from softprompt.base_models import ModelLoadError, check_load_args, empty_model, load_model, tensor_listing
from softprompt.core.config import TaskType
from softprompt.devices import launched, resolve_device
from softprompt.sharding import distributed, zero3

logger = logging.getLogger(__name__)

Notify = Callable[[str, dict[str, Any]], None]


class ShardingError(ValueError):
    """A run that asks for two ways of sharding, or one that cannot start; says which."""


class Strategy:
    """One process, or plain data parallel: every process holds the whole frozen model.

    Args:
        device: Where the frozen model computes.
        dtype: The dtype it is loaded in.
    """

    name = "replicated"
    #: every forward pass is a collective (the weights are gathered for it)
    sharded = False

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype

    # ------------------------------------------------------------------ who and how many
    @property
    def world(self) -> int:
        return distributed.world_size()

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and shows progress."""
        return distributed.is_main()

    def describe(self) -> dict[str, Any]:
        """What run_config.json records under "resolved"."""
        return {"world_size": self.world, "fsdp": False, "zero3": False}

    # ------------------------------------------------------------------ the model
    def load(self, model: str | None, notify: Notify) -> tuple[Any, Any]:
        """The frozen base model and its tokenizer, as this strategy holds them."""
        return load_model(model, dtype=self.dtype, device=self.device)

    def shard(self, base: Any, notify: Notify) -> None:
        """Wrap the frozen base before the prompt is added (a no-op here)."""

    def place_prompt(self, model: Any) -> None:
        """Put the freshly added prompt where this strategy trains it (already there here)."""

    @contextlib.contextmanager
    def full_embeddings(self, base: Any) -> Iterator[None]:
        """The whole input-embedding table on every rank for the block (saving an adapter reads
        some of its rows to fingerprint the base); a collective where the table is sharded."""
        with distributed.gathered_input_embeddings(base):
            yield

    # ------------------------------------------------------------------ a step
    def passes(self, group: list[list[int]]) -> list[tuple[list[int], bool]]:
        """This rank's micro-batches of an optimizer step's `group`, each with whether it counts
        (a stand-in pass, whose loss counts zero, keeps a sharded model's collectives in step)."""
        return [(indices, True) for indices in distributed.shard(group)]

    def training_pass(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """How a training pass feeds the prompt: from its cached keys/values here."""
        return contextlib.nullcontext()

    @property
    def stops_at_a_bad_loss(self) -> bool:
        """Whether a rank may skip its remaining passes once a loss is NaN or infinite (a
        sharded model's other ranks still wait for this one's collectives)."""
        return not self.sharded

    def reduce(self, params: list[torch.nn.Parameter], values: list[float]) -> list[float]:
        """The prompt's gradients summed over the processes and `values` (loss, Ctrl-C, a bad
        loss) with them, in one collective; `values` as they are in one process."""
        return distributed.reduce_gradients(params, values)

    def stop(self, here: bool, agreed: bool) -> bool:
        """Whether to stop between steps: this process's Ctrl-C in one process, the agreed one
        (reduced with the last step) in several, so every rank stops at the same step."""
        return here if self.world == 1 else agreed

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        """How evaluation is split: examples shared out over the ranks, predictions gathered."""
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ rank 0's state
    def broadcast(self, params: list[torch.nn.Parameter]) -> None:
        """Every rank takes rank 0's values of `params` (the prompt, after init or a load)."""
        distributed.broadcast_parameters(params)

    def broadcast_object(self, obj: Any) -> Any:
        return distributed.broadcast_object(obj)

    def barrier(self) -> None:
        distributed.barrier()

    @property
    def reuses_kept_scores(self) -> bool:
        """Whether the bare model's kept test scores (softprompt.training.score_cache) may stand in for
        scoring it (not where its weights are sharded: the cache key reads them)."""
        return not self.sharded


class Fsdp(Strategy):
    """PyTorch's FSDP2 shards the frozen model over the processes (`distributed.shard_model`)."""

    name = "fsdp"
    sharded = True

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fsdp": True}

    def load(self, model: str | None, notify: Notify) -> tuple[Any, Any]:
        # rank 0 reads the model into host memory; the others build it on the meta device (no
        # weights read, no memory taken) and get rank 0's weights when it is sharded
        return load_model_on_rank0(model, dtype=self.dtype)

    def shard(self, base: Any, notify: Notify) -> None:
        # Sharded before the prompt is added: only rank 0 held the weights until now. The
        # prompt's initialisation then gathers the embedding table (softprompt.core.init), which
        # gives bit-identical rows. The base is frozen first: FSDP gives the weights it
        # gathers the requires_grad they have when it first gathers them.
        notify("phase", {"message": f"sharding the model over {self.world} processes (FSDP)"})
        for p in base.parameters():
            p.requires_grad_(False)
        distributed.shard_model(base, self.device, weights_from_rank0=True)

    def place_prompt(self, model: Any) -> None:
        # the prompt stays whole on every process (its gradient is all-reduced by hand)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.data = p.data.to(self.device)

    def passes(self, group: list[list[int]]) -> list[tuple[list[int], bool]]:
        # Every forward and backward gathers sharded weights, a collective: every rank makes
        # the same number of passes. A rank with fewer micro-batches (the end of an epoch)
        # repeats one whose loss counts zero.
        mine = distributed.shard(group)
        turns = -(-len(group) // self.world)
        return [(mine[t], True) if t < len(mine) else (group[0], False) for t in range(turns)]

    def training_pass(self, model: Any) -> contextlib.AbstractContextManager[None]:
        """A training pass feeds the prompt as embeddings instead of starting from its cached
        keys/values (the same results; see `softprompt.core.prefix`): the prompt's KV is computed
        inside each transformer block and reaches the loss through the cache, not through the
        block's output, so FSDP's backward hooks (registered on block outputs) would not gather
        the block's weights again for that part of the backward pass. ZeRO-3 gathers on the
        same kind of hooks and takes the same path. Evaluation runs without gradients and
        keeps the cached path."""
        return _attribute(model, "prefix_cache", False)

    def evaluation(self) -> contextlib.AbstractContextManager[None]:
        """Every rank scores every example (see `distributed.replicated`)."""
        return distributed.replicated()


class Zero3(Fsdp):
    """DeepSpeed ZeRO-3 partitions the frozen model as it is loaded (`softprompt.sharding.zero3`)."""

    name = "zero3"

    def __init__(self, device: torch.device, dtype: torch.dtype, plan: zero3.Plan) -> None:
        super().__init__(device, dtype)
        self.plan = plan
        #: the partitioned base and what keeps it working (`softprompt.sharding.zero3.Sharded`)
        self.partitioned: zero3.Sharded | None = None

    def describe(self) -> dict[str, Any]:
        return {**Strategy.describe(self), "zero3": True}

    def load(self, model: str | None, notify: Notify) -> tuple[Any, Any]:
        # every rank loads its 1/N of the weights (transformers under zero.Init)
        try:
            self.partitioned = zero3.load_partitioned(model, self.plan, self.dtype, self.device, self.world)
        except zero3.Zero3Error as err:
            raise ShardingError(str(err)) from err
        return self.partitioned.base, self.partitioned.tokenizer

    def shard(self, base: Any, notify: Notify) -> None:
        # DeepSpeed's hooks gather each module's weights for its forward and backward passes; the
        # prompt, added after, is an ordinary parameter (whole on every rank). Its initialisation
        # gathers the embedding table (softprompt.core.init): the rows are those of the whole model.
        notify("phase", {"message": f"sharding the model over {self.world} processes (DeepSpeed ZeRO-3)"})
        assert self.partitioned is not None and self.partitioned.base is base
        zero3.attach(self.partitioned)

    def place_prompt(self, model: Any) -> None:
        """The prompt is made on the device already (the base is not on the meta device)."""


def choose(fsdp: bool, zero3_flag: bool, device: torch.device, dtype: torch.dtype) -> Strategy:
    """The strategy of a run: ZeRO-3 for `--zero3` or `accelerate launch --use_deepspeed
    --zero_stage 3`, FSDP for `--fsdp` or `accelerate launch --use_fsdp`, else replicated.
    Sharding needs several processes: in one process both are no-ops. The one place that
    refuses two ways of sharding at once.

    Raises:
        ShardingError: FSDP and ZeRO-3 both asked for (by flags or by the launcher), or
            accelerate's DeepSpeed settings unreadable.
    """
    fsdp = fsdp or distributed.accelerate_fsdp()
    try:
        plan = zero3.plan(zero3_flag) if distributed.active() else None
    except zero3.Zero3Error as err:
        raise ShardingError(str(err)) from err
    asked = "--zero3" if zero3_flag else plan and "accelerate launch --use_deepspeed --zero_stage 3"
    if fsdp and asked:
        raise ShardingError(f"--fsdp and {asked} are two ways to shard the frozen model; choose one.")
    if plan is not None:
        return Zero3(device, dtype, plan)
    if fsdp and distributed.active():
        return Fsdp(device, dtype)
    return Strategy(device, dtype)


def join_process_group(device_setting: str) -> bool:
    """Start torch.distributed when a launcher started this process as one of several and no
    group exists yet; returns whether this call started it (then `close_process_group`)."""
    if launched() and not distributed.active():
        return distributed.init(resolve_device(device_setting))
    return False


def close_process_group(owned: bool) -> None:
    """End the process group `join_process_group` started (`owned`); a no-op otherwise."""
    if owned:
        distributed.close()


def load_model_on_rank0(
    name_or_path: str | os.PathLike | None = None,
    *,
    task_type: TaskType | str = "CAUSAL_LM",
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> tuple[Any, Any]:
    """`load_model` for a model that `distributed.shard_model(..., weights_from_rank0=True)`
    shards next: in a run of several processes only rank 0 reads the weights.

    Rank 0 loads the model (on the CPU) and its tokenizer exactly as `load_model` does (the
    packaged default model, a local folder or a hub id), then sends the other ranks its
    config, generation config, tokenizer and the name, shape and dtype of every weight and
    buffer. They build the same model from that config on the `meta` device: no weight file
    is opened and no memory is taken for the weights, which `shard_model` later fills from
    rank 0's. (So with N processes on a machine the host holds one copy of the model while
    loading, not N.) Every rank must call it. In one process it is `load_model`.

    Returns:
        `(model, tokenizer)`: on rank 0 as `load_model` gives them; elsewhere the model on the
        meta device (in eval mode, weights tied as the config says) and rank 0's tokenizer.

    Raises:
        ModelLoadError: Rank 0 could not load the model (every rank raises it: the others
            with rank 0's message), or the model built from its config differs from rank 0's.
        ValueError, TypeError: An argument is invalid.
    """
    kwargs: dict[str, Any] = {"task_type": task_type, "num_labels": num_labels, "dtype": dtype,
                              "cache_dir": cache_dir, "revision": revision}  # fmt: skip
    if not distributed.active():
        return load_model(name_or_path, **kwargs)
    task = TaskType.parse(task_type, "task_type")
    check_load_args(task, num_labels, dtype, revision)  # on every rank: the same error everywhere
    if distributed.is_main():
        try:
            model, tokenizer = load_model(name_or_path, **kwargs)
        except Exception as err:
            distributed.broadcast_object({"error": f"{type(err).__name__}: {err}"})
            raise
        distributed.broadcast_object(
            {
                "config": model.config,
                "generation_config": getattr(model, "generation_config", None),
                "tokenizer": tokenizer,
                "tensors": tensor_listing(model),
            }
        )
        return model, tokenizer
    sent = distributed.broadcast_object(None)
    if "error" in sent:
        raise ModelLoadError(f"(rank 0) {sent['error']}")
    return empty_model(task, sent), sent["tokenizer"]


@contextlib.contextmanager
def _attribute(obj: Any, name: str, value: Any) -> Iterator[None]:
    previous = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, previous)


__all__ = ["Fsdp", "ShardingError", "Strategy", "Zero3", "choose", "close_process_group",
           "join_process_group", "load_model_on_rank0"]  # fmt: skip
