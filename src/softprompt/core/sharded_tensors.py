"""Tensor helpers for frozen weights that DeepSpeed ZeRO-3 may have partitioned.

A leaf module the core may import (`init`, `introspect`): the sharding machinery itself
(`softprompt.sharding.zero3`, `softprompt.sharding.distributed`) sits above the core, and these helpers only
look at a tensor, or gather one for a block, without knowing how the run was sharded.
Without DeepSpeed every function here is the plain-tensor case.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch


def partitioned(tensor: Any) -> bool:
    """Whether `tensor` is a parameter partitioned by ZeRO-3."""
    return isinstance(tensor, torch.Tensor) and hasattr(tensor, "ds_id")


def full_shape(tensor: torch.Tensor) -> torch.Size:
    """The shape of `tensor`, its whole shape when ZeRO-3 partitioned it."""
    return tensor.ds_shape if partitioned(tensor) else tensor.shape


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """The whole of the ZeRO-3 partitioned `params` on every process for the block (read only),
    partitioned again after; a collective (every process enters it with the same parameters). A
    no-op when none is partitioned."""
    params = [p for p in params if partitioned(p)]
    if not params:
        yield
        return
    # (DeepSpeed is optional: `pip install 'softprompt[deepspeed]'`; only a partitioned weight needs it)
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


__all__ = ["full_shape", "gathered", "partitioned"]
