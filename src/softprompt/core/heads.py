"""Task heads trained with a prompt, one copy per adapter, routed per batch row.

A new classification or QA head is trained alongside the prompt (it starts random, so a
frozen one would make the prompt learn against noise). `HeadSwitch` takes the head's
place in the base model and keeps the original plus one copy per adapter; during a
forward pass every row goes through the copy of its own adapter, so a batch may mix
adapters with different heads. This is the one place where a module of the base model
is replaced.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

Routing = list[tuple[str | None, torch.Tensor | None]]


class HeadSwitch(nn.Module):
    """Stands in for a head module; calls the copy belonging to each row's adapter.

    Args:
        original: The base model's head, kept frozen and used by adapters without a copy.
    """

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.default_adapter: str | None = None
        self._routing: Routing | None = None

    def add(self, adapter: str, trainable: bool) -> nn.Module:
        head = copy.deepcopy(self.original)
        for p in head.parameters():
            p.requires_grad_(trainable)
        self.copies[adapter] = head
        return head

    def remove(self, adapter: str) -> None:
        if adapter in self.copies:
            del self.copies[adapter]

    def head_for(self, adapter: str | None) -> nn.Module:
        if adapter is not None and adapter in self.copies:
            return self.copies[adapter]
        return self.original

    def forward(self, x: torch.Tensor, *args, **kwargs):
        routing = self._routing if self._routing is not None else [(self.default_adapter, None)]
        if len(routing) == 1:
            return self.head_for(routing[0][0])(x, *args, **kwargs)
        out = None
        for adapter, rows in routing:
            part = self.head_for(adapter)(x.index_select(0, rows), *args, **kwargs)
            if out is None:
                out = part.new_zeros((x.shape[0],) + tuple(part.shape[1:]))
            out = out.index_copy(0, rows, part)
        return out


@contextmanager
def routed(switches: list[HeadSwitch], routing: Routing) -> Iterator[None]:
    """Route batch rows to adapters' heads for the duration of one forward pass."""
    previous = [s._routing for s in switches]
    for s in switches:
        s._routing = routing
    try:
        yield
    finally:
        for s, prev in zip(switches, previous):
            s._routing = prev


def find_module(root: nn.Module, name: str) -> tuple[nn.Module, str, nn.Module] | None:
    """Resolve a head name to (parent, attribute, module).

    `name` is a dotted path from the model root, or a bare attribute name of one of the
    root's direct children (PEFT's "score" / "classifier" / "qa_outputs").
    """
    parts = name.split(".")
    parent = root
    for part in parts[:-1]:
        parent = getattr(parent, part, None)
        if not isinstance(parent, nn.Module):
            return None
    module = getattr(parent, parts[-1], None)
    if isinstance(module, nn.Module):
        return parent, parts[-1], module
    return None
