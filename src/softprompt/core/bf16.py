"""bfloat16 policy: whether a device computes bfloat16 natively (so autocast is a speed-up),
and bfloat16 copies of the frozen linear weights for a run under autocast."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn


@lru_cache(maxsize=8)
def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 matrix products natively (so autocast is a speed-up).

    CUDA: `torch.cuda.is_bf16_supported()`. CPU: the AMX-BF16 or AVX512-BF16 instruction
    sets (read from /proc/cpuinfo; elsewhere assumed absent, where bfloat16 is emulated
    and slower than float32).
    """
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def resolve_bf16(setting: bool | None, device: torch.device) -> bool:
    """A bf16 option as given (True/False), or for None whether `device` has native bfloat16."""
    return native_bf16(device) if setting is None else bool(setting)


BF16_COPY_MAX_BYTES = 2 << 30


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The layers whose weight autocast casts: `nn.Linear` and GPT-2's `Conv1D`."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]


@contextmanager
def bf16_weight_copies(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Give the frozen float32 linear layers bfloat16 copies of their weights for the block.

    Under bfloat16 autocast every linear layer casts its float32 weight to bfloat16 on every
    call: autocast keeps its cast only for weights that require grad, and the base model's
    are frozen. A training step therefore re-reads and re-writes every weight of the model
    once or twice. With copies made once, autocast finds bfloat16 weights and casts nothing;
    the results are identical (the same rounding), the copies cost half the linear weights'
    memory while the block runs (skipped above `BF16_COPY_MAX_BYTES`), and the model's own
    parameters are put back untouched afterwards, however the block ends. Only use it with
    every forward of the block under bfloat16 autocast.
    """
    swaps: list[tuple[nn.Module, nn.Parameter]] = []
    if enabled:
        layers = linear_layers(model)
        weights = [m.weight for m in layers]
        usable = all(w.dtype == torch.float32 and w.device.type != "meta" for w in weights)
        size = sum(w.numel() * 2 for w in weights if not w.requires_grad)
        if usable and size <= BF16_COPY_MAX_BYTES and not any(hasattr(m, "_hf_hook") for m in layers):
            copies: dict[int, nn.Parameter] = {}  # a weight shared by several layers is copied once
            for m in layers:
                w = m.weight
                if not w.requires_grad:
                    if id(w) not in copies:
                        copies[id(w)] = nn.Parameter(w.detach().to(torch.bfloat16), requires_grad=False)
                    swaps.append((m, w))
                    m.weight = copies[id(w)]
    try:
        yield
    finally:
        for m, w in swaps:
            m.weight = w
