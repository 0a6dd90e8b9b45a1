"""DeepSpeed ZeRO stage 3 as the other way to shard the frozen model over the processes of a run
(`--zero3`, or `accelerate launch --use_deepspeed --zero_stage 3` with no softprompt flag).

Only the frozen base model is handed to DeepSpeed. It is loaded partitioned (transformers'
`from_pretrained` under `zero.Init`, while this module's `HfDeepSpeedConfig` is alive): each
process keeps 1/N of every weight. `deepspeed.initialize(model=base)` without an optimizer then
puts DeepSpeed's gather/release hooks on every submodule (the ZeRO-Inference set-up): a module's
weights are gathered for its forward and again for its backward, and released after. The
engine itself is never called (no `engine(...)`, `engine.backward`, `engine.step`): softprompt
calls the model as in one process, its own optimizer steps the prompt, and the prompt's
gradient is summed over the processes by hand (`distributed.reduce_gradients`), as without
sharding. So the training loop is FSDP's (see `softprompt.training.trainer`): every rank makes the same
forward and backward passes, evaluation is not shared out, training passes take the uncached
prompt path.

Outside a module's forward a weight is an empty placeholder (shape `(0,)`; its real shape is
`ds_shape`): whatever reads the weights directly gathers them first with `gathered` (prompt
initialisation from the embedding table, the base-model fingerprint of a saved adapter) or
uses `ds_shape` (the hidden size, the vocabulary size).

On a CPU (DeepSpeed's cpu accelerator, gloo) DeepSpeed would JIT-compile a shared-memory
all-reduce with g++ on its first use (about 40 s, and an error on a machine without a
compiler); it serves only DeepSpeed's inference tensor parallelism, never ZeRO-3, so it is
not built (`_skip_shm_build`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from transformers.integrations import HfDeepSpeedConfig

from softprompt.base_models import DEFAULT_ALIASES, default_model_dir, load_model
from softprompt.core.sharded_tensors import partitioned

logger = logging.getLogger(__name__)

# accelerate launch --use_deepspeed's environment (accelerate.utils.launch.prepare_deepspeed_cmd_env)
USE_ENV = "ACCELERATE_USE_DEEPSPEED"
STAGE_ENV = "ACCELERATE_DEEPSPEED_ZERO_STAGE"
CONFIG_FILE_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"
OFFLOAD_PARAM_ENV = "ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE"
ACCELERATE_DEFAULT_STAGE = 2  # accelerate's own default when neither the flag nor a config file says

# Every weight partitioned, whatever its size (DeepSpeed keeps weights under 1e5 values whole on
# every process by default); no prefetching by the trace of the first forward pass (softprompt's
# passes differ: the prompt's own pass, evaluation, generation).
DEFAULT_ZERO = {
    "stage": 3,
    "stage3_param_persistence_threshold": 0,
    "stage3_model_persistence_threshold": 0,
    "stage3_prefetch_bucket_size": 0,
    "overlap_comm": False,
}


class Zero3Error(RuntimeError):
    """ZeRO-3 was asked for but cannot be set up; the message says why and what to do."""


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


@dataclass
class Plan:
    """How ZeRO-3 is set up for a run.

    Attributes:
        source: What asked for it (`--zero3` or accelerate's environment).
        zero: DeepSpeed's `zero_optimization` section.
    """

    source: str
    zero: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ZERO))


def accelerate_settings() -> tuple[int, dict[str, Any]] | None:
    """The ZeRO stage and `zero_optimization` settings `accelerate launch --use_deepspeed` passes
    in its environment (its `--zero_stage`, `--offload_param_device`, or the `zero_optimization`
    section of `--deepspeed_config_file`; values "auto" left out), or None without it.

    Raises:
        Zero3Error: The stage or the config file cannot be read.
    """
    if not _true(os.environ.get(USE_ENV)):
        return None
    zero: dict[str, Any] = {}
    path = os.environ.get(CONFIG_FILE_ENV, "").strip()
    if path and path.lower() != "none":
        try:
            with open(path, encoding="utf-8") as fh:
                section = json.load(fh).get("zero_optimization", {}) or {}
        except (OSError, ValueError, AttributeError) as err:
            message = f"cannot read the DeepSpeed config file {path} ({CONFIG_FILE_ENV}): {err}"
            raise Zero3Error(message) from None
        zero = {k: v for k, v in section.items() if v != "auto"}
    stage_text = os.environ.get(STAGE_ENV, "").strip()
    try:
        stage = int(stage_text) if stage_text else int(zero.get("stage", ACCELERATE_DEFAULT_STAGE))
    except (TypeError, ValueError):
        raise Zero3Error(f"{STAGE_ENV} must be a ZeRO stage (0-3); got {stage_text!r}.") from None
    offload = os.environ.get(OFFLOAD_PARAM_ENV, "").strip().lower()
    if offload and offload != "none":
        zero["offload_param"] = {**zero.get("offload_param", {}), "device": offload}
    return stage, zero


def plan(zero3_flag: bool) -> Plan | None:
    """Whether (and how) this run shards its frozen model with ZeRO-3: `--zero3`, or `accelerate
    launch --use_deepspeed` with stage 3. Stages 0-2 shard only gradients and optimizer state,
    which the frozen model has none of: the run is plain data parallel (logged). (ZeRO-3
    together with FSDP is refused by `softprompt.sharding.strategy.choose`.)

    Raises:
        Zero3Error: accelerate's DeepSpeed settings cannot be read.
    """
    settings = accelerate_settings()
    if settings is not None and settings[0] != 3 and not zero3_flag:
        logger.info(
            "accelerate launch --use_deepspeed with ZeRO stage %d: stages 1-2 partition gradients and "
            "optimizer state, which the frozen model does not have, so the processes run as plain data "
            "parallel (each holds the whole model); --zero_stage 3 shards its weights.",
            settings[0],
        )
        settings = None
    if not zero3_flag and settings is None:
        return None
    extra = settings[1] if settings is not None else {}
    zero = {**DEFAULT_ZERO, **extra, "stage": 3}
    return Plan("--zero3" if zero3_flag else "accelerate launch --use_deepspeed", zero)


def ds_config(plan_: Plan, dtype: torch.dtype, world: int) -> dict[str, Any]:
    """DeepSpeed's configuration: the ZeRO section, the weights' dtype (ZeRO-3 partitions them in
    the dtype its config names), and the batch sizes DeepSpeed insists on (unused: the batches are
    softprompt's)."""
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": dict(plan_.zero),
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def available() -> bool:
    """Whether DeepSpeed is installed (without importing it: that takes seconds)."""

    return importlib.util.find_spec("deepspeed") is not None


def _import_deepspeed(device: torch.device) -> Any:
    """deepspeed, on the accelerator of `device` (DeepSpeed picks a GPU when it sees one; a run on
    the CPU of such a machine tells it so)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        # (optional: `pip install 'softprompt[deepspeed]'`; only --zero3 needs it)
        import deepspeed
    except ImportError as err:
        raise Zero3Error(
            f"ZeRO-3 needs DeepSpeed ({err}): pip install 'softprompt[deepspeed]' (or deepspeed)."
        ) from None
    from deepspeed.accelerator import get_accelerator

    found = get_accelerator().device_name()
    wanted = "cpu" if device.type == "cpu" else device.type
    if found != wanted:
        raise Zero3Error(
            f"DeepSpeed runs on its {found!r} accelerator but this run computes on {device}; set "
            f"DS_ACCELERATOR={wanted} or --device to match."
        )

    # DeepSpeed gathers weights with a torch.distributed function torch now calls deprecated
    warnings.filterwarnings("ignore", r".*all_gather_into_tensor` is deprecated", FutureWarning)
    return deepspeed


def _skip_shm_build() -> None:
    """On DeepSpeed's cpu accelerator, mark its shared-memory all-reduce op as not buildable, so
    setting up its communication does not JIT-compile it (see the module docstring). DeepSpeed
    keeps the probed table of ops in `deepspeed.ops.__compatible_ops__` (one dict, which it
    documents as editable); without the op it all-reduces through torch.distributed."""
    # (optional, as in `_import_deepspeed`)
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    try:
        compatible = deepspeed.ops.__compatible_ops__
    except AttributeError:  # pragma: no cover  (another DeepSpeed layout: it builds the op)
        logger.info("DeepSpeed may compile its shared-memory all-reduce on first use (g++, about 40 s).")
        return
    compatible["deepspeed_shm_comm"] = False


def _join(deepspeed: Any) -> None:
    """DeepSpeed's communication on the process group softprompt already joined (its timeout,
    gloo or nccl)."""
    _skip_shm_build()

    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


@dataclass
class Sharded:
    """A base model partitioned by ZeRO-3, and what must stay alive while it is used: the
    `HfDeepSpeedConfig` (transformers reads ZeRO-3's state through a weak reference to it, e.g.
    `generate` synchronises the processes) and DeepSpeed's engine (its hooks)."""

    base: Any
    tokenizer: Any
    config: dict[str, Any]
    hf_config: Any
    engine: Any = None


def load_partitioned(
    name_or_path: str | None, plan_: Plan, dtype: torch.dtype, device: torch.device, world: int
) -> Sharded:
    """Load the base model with every weight partitioned over the processes (each reads the
    model as transformers does under ZeRO-3 and keeps its 1/N); a collective.

    Raises:
        Zero3Error: DeepSpeed is missing or runs on another device; the weights came out in
            another dtype.
    """

    deepspeed = _import_deepspeed(device)
    _join(deepspeed)
    if name_or_path is None or str(name_or_path).strip().lower() in {a.lower() for a in DEFAULT_ALIASES}:
        # the packaged model is converted (once, under a file lock) before ZeRO-3 is switched on:
        # the conversion loads and saves a whole model
        name_or_path = str(default_model_dir())
    config = ds_config(plan_, dtype, world)

    hf_config = HfDeepSpeedConfig(config)  # from_pretrained loads under zero.Init while it lives
    base, tokenizer = load_model(name_or_path, dtype=dtype)
    weight = base.get_input_embeddings().weight
    if not partitioned(weight):
        raise Zero3Error(f"the weights of {name_or_path} were not partitioned by ZeRO-3 when loaded.")
    if weight.dtype != dtype:
        raise Zero3Error(f"ZeRO-3 partitioned the weights in {weight.dtype}, not {dtype}.")
    return Sharded(base, tokenizer, config, hf_config)


def attach(sharded: Sharded) -> Any:
    """DeepSpeed's gather/release hooks on every submodule of the frozen (partitioned) base; a
    collective. Returns the engine, which is kept but never called."""
    # (optional, as in `_import_deepspeed`)
    import deepspeed

    for p in sharded.base.parameters():
        p.requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=sharded.base, config=sharded.config)
    if engine.module is not sharded.base:  # pragma: no cover  (DeepSpeed wraps the model itself)
        raise Zero3Error("DeepSpeed replaced the model instead of adding its hooks to it.")
    sharded.engine = engine
    return engine


__all__ = ["Plan", "Sharded", "Zero3Error", "accelerate_settings", "attach", "available", "ds_config",
           "load_partitioned", "plan"]  # fmt: skip
