"""Sharding: how a training run spreads over processes. `strategy` holds the one object a
run chooses (`choose`: one process or data parallel, FSDP, ZeRO-3) and the `Trainer` calls;
`distributed` the process group and its collectives; `zero3` DeepSpeed ZeRO-3."""

from __future__ import annotations

from softprompt.sharding.strategy import (
    Fsdp,
    ShardingError,
    Strategy,
    Zero3,
    choose,
    close_process_group,
    join_process_group,
    load_model_on_rank0,
)

__all__ = ["Fsdp", "ShardingError", "Strategy", "Zero3", "choose", "close_process_group",
           "join_process_group", "load_model_on_rank0"]  # fmt: skip
