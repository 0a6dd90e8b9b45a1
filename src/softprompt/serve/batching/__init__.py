"""How the built-in engine runs its batch: one interface (`Batcher`: `join` the admitted
requests, `step` the running rows, `drop_done`, `fail_all`, `when_idle`), two ways behind it,
with the same results (each row gives the numbers it gives alone, checked against
`SoftPromptModel.generate` in the tests):

- `PackedBatcher` (`packed`): prefill chunks and decode tokens of all rows in one forward,
  no padding; the default where the model passes its start-up check.
- `PaddedBatcher` (`padded`): joining requests prefilled together, then left-padded decode
  steps; for a model whose attention cannot be packed, or on request.

`choose` picks one for a model. Both share `Row` and the sampling and finishing in
`Batcher` (`rows`).
"""

from __future__ import annotations

from typing import Any

import torch

from softprompt.serve.adapters import AdapterRegistry
from softprompt.serve.batching.packed import PackedBatcher
from softprompt.serve.batching.padded import PaddedBatcher
from softprompt.serve.batching.rows import Batcher, Row


def choose(
    model: Any,
    registry: AdapterRegistry,
    dtype: torch.dtype,
    *,
    packed: bool | None = None,
    prefill_tokens: int = 256,
    metrics: Any = None,
    base_id: str = "base",
) -> Batcher:
    """The batcher for `model`: packed steps where they give its numbers (`packed=None`),
    padded batches for `packed=False`.

    Raises:
        ValueError: `packed=True` for a model whose attention cannot be packed.
    """
    common = {"metrics": metrics, "base_id": base_id}
    if packed is not None and not packed:
        return PaddedBatcher(model, registry, dtype, **common)
    shape = PackedBatcher.probe(model, dtype)
    if shape is None:
        if packed:
            raise ValueError(
                f"{type(model.base_model).__name__} cannot run packed steps (its attention does not go "
                "through transformers' attention interface); start the server without packed=True."
            )
        return PaddedBatcher(model, registry, dtype, **common)
    return PackedBatcher(model, registry, dtype, kv_shape=shape, prefill_tokens=prefill_tokens, **common)


__all__ = ["Batcher", "PackedBatcher", "PaddedBatcher", "Row", "choose"]
