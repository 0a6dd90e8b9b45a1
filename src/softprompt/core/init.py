"""Initial values of a soft prompt, one function per `PromptTuningInit` strategy.

Every function returns a float32 tensor of shape `(num_tokens, hidden)` computed from the
model's input embedding module `embed` (called on token ids, so models that scale their
embeddings, such as BART, start from the vectors they actually see) and uses torch's
global random generator, so `torch.manual_seed` makes the result reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer

from softprompt.core.config import PromptTuningConfig, PromptTuningInit
from softprompt.core.sharded_tensors import full_shape, gathered, partitioned

logger = logging.getLogger(__name__)

# Rows drawn to estimate the embedding table's statistics for RANDOM initialisation.
_STAT_ROWS = 8192


def _embed_ids(embed: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    device = _module_device(embed)
    with torch.no_grad():
        if _sharded(getattr(embed, "weight", None)):
            return _embed_ids_sharded(embed, ids.to(device))
        if any(partitioned(p) for p in embed.parameters()):
            # DeepSpeed ZeRO-3: the table is gathered whole on every process for the lookup (a
            # collective) and read by the module's own forward (not __call__: DeepSpeed's hooks
            # would release the table after it); bit-identical to the unpartitioned lookup
            with gathered(embed.parameters()):
                return embed.forward(ids.to(device)).detach().to("cpu", torch.float32)
        return embed(ids.to(device)).detach().to("cpu", torch.float32)


def _sharded(weight: Any) -> bool:
    """Whether `weight` is split over the processes of a run (an FSDP2 DTensor)."""
    try:
        # (only an FSDP-sharded table is a DTensor; torch builds without distributed lack the module)
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover  (a torch without DTensor)
        return False
    return isinstance(weight, DTensor)


def _embed_ids_sharded(embed: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """`embed(ids)` when FSDP has split the embedding table over the processes (PEFT read
    such tables wrongly: its issues #206 and #1633). Every process gathers the whole table
    for the lookup (a collective: every process initialises the same prompts, so they make
    the same calls in the same order), then the module's own forward reads the rows (models
    that scale their embeddings included), and the table is split again. The gather copies
    the weights, so the result is bit-identical to the unsharded lookup.

    Raises:
        TypeError: The table is sharded as part of a larger FSDP unit, which this module
            cannot gather on its own.
    """
    # (only an FSDP-sharded table gets here; torch < 2.6 keeps FSDP2 elsewhere)
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(embed, FSDPModule):
        raise TypeError(
            f"the input embeddings ({type(embed).__name__}) are sharded inside a larger FSDP unit, so "
            "the prompt cannot be initialised from them here; make them a unit of their own "
            "(fully_shard(model.get_input_embeddings()) before the model's, as "
            "softprompt.sharding.distributed.shard_model does) or add the prompt before sharding."
        )
    embed.unshard()  # all-gathers the table
    try:
        # forward, not __call__: FSDP's hooks would take this module for the root of the model
        return embed.forward(ids).detach().to("cpu", torch.float32)
    finally:
        embed.reshard()


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _vocab_rows(embed: nn.Module) -> int:
    weight = getattr(embed, "weight", None)
    if weight is None:
        raise TypeError(f"the input embedding module {type(embed).__name__} has no weight matrix")
    return int(full_shape(weight)[0])  # (a ZeRO-3 partitioned table's own shape is (0,))


def special_token_ids(tokenizer: Any | None, model_config: Any | None = None) -> set[int]:
    """Ids that must never seed a prompt: special, added-special and padding tokens."""
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None)
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "unk_token_id"):
            value = getattr(tokenizer, name, None)
            if isinstance(value, int):
                ids.add(value)
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        for idx, tok in added.items():
            if getattr(tok, "special", False):
                ids.add(int(idx))
    if model_config is not None:
        for name in (
            "pad_token_id",
            "bos_token_id",
            "eos_token_id",
            "unk_token_id",
            "decoder_start_token_id",
        ):
            value = getattr(model_config, name, None)
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value if isinstance(v, int))
    return ids


def candidate_ids(embed: nn.Module, tokenizer: Any | None, excluded: Iterable[int]) -> torch.Tensor:
    """Ordinary vocabulary ids: below both the table size and the tokenizer's length, not excluded."""
    rows = _vocab_rows(embed)
    if tokenizer is not None:
        rows = min(rows, len(tokenizer))
    keep = torch.ones(rows, dtype=torch.bool)
    bad = torch.tensor(sorted(i for i in excluded if 0 <= i < rows), dtype=torch.long)
    if bad.numel():
        keep[bad] = False
    ids = keep.nonzero().flatten()
    if ids.numel() == 0:
        raise ValueError("the vocabulary has no ordinary (non-special) tokens to sample a prompt from")
    return ids


def init_random(num_tokens: int, embed: nn.Module, candidates: torch.Tensor) -> torch.Tensor:
    """Gaussian vectors shaped like the model's own token embeddings.

    Each dimension is drawn from N(mean_d, std_d), the mean and standard deviation of that
    dimension over (a sample of) the ordinary vocabulary. PEFT draws from N(0, 1) instead,
    which for most models is an order of magnitude larger than any real token embedding
    and trains poorly (Lester et al. 2021 used a small uniform range for the same reason).

    Returns:
        `(num_tokens, hidden)` float32.
    """
    if candidates.numel() > _STAT_ROWS:
        pick = torch.randperm(candidates.numel())[:_STAT_ROWS]
        candidates = candidates[pick]
    table = _embed_ids(embed, candidates)  # (rows, hidden)
    mean = table.mean(dim=0)
    std = table.std(dim=0, unbiased=False).clamp_min(1e-6)
    return mean + std * torch.randn(num_tokens, table.shape[1])


def init_sample_vocab(num_tokens: int, embed: nn.Module, candidates: torch.Tensor) -> torch.Tensor:
    """Embeddings of distinct random ordinary tokens (repeats only if the vocabulary is smaller).

    Returns:
        `(num_tokens, hidden)` float32.
    """
    reps = -(-num_tokens // candidates.numel())
    order = torch.cat([torch.randperm(candidates.numel()) for _ in range(reps)])[:num_tokens]
    return _embed_ids(embed, candidates[order])


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if ids and isinstance(ids[0], list):  # some tokenizers batch a single string
        ids = ids[0]
    return [int(i) for i in ids]


def init_text(num_tokens: int, embed: nn.Module, tokenizer: Any, text: str) -> torch.Tensor:
    """Token embeddings of `text` (no special tokens), repeated or cut to `num_tokens`.

    Returns:
        `(num_tokens, hidden)` float32.
    """
    ids = _tokenize(tokenizer, text)
    if not ids:
        raise ValueError(
            f"prompt_tuning_init_text {text!r} tokenizes to no tokens; give text that contains words."
        )
    reps = -(-num_tokens // len(ids))
    ids = (ids * reps)[:num_tokens]
    return _embed_ids(embed, torch.tensor(ids, dtype=torch.long))


def init_class_labels(
    num_tokens: int,
    embed: nn.Module,
    tokenizer: Any,
    labels: Sequence[str],
    candidates: torch.Tensor,
) -> torch.Tensor:
    """One position per label word, the rest sampled from the vocabulary (Lester et al. 2021).

    A label word that tokenizes to several tokens contributes the mean of their embeddings.
    Labels take the first positions, in the order given.

    Returns:
        `(num_tokens, hidden)` float32.
    """
    if len(labels) > num_tokens:
        raise ValueError(
            f"{len(labels)} label words do not fit in {num_tokens} virtual tokens; raise num_virtual_tokens."
        )
    rows = []
    for word in labels:
        ids = _tokenize(tokenizer, word)
        if not ids:
            raise ValueError(f"label word {word!r} tokenizes to no tokens; give a real word.")
        rows.append(_embed_ids(embed, torch.tensor(ids, dtype=torch.long)).mean(dim=0))
    out = torch.stack(rows)
    if num_tokens > len(labels):
        out = torch.cat([out, init_sample_vocab(num_tokens - len(labels), embed, candidates)])
    return out


def load_init_tokenizer(config: PromptTuningConfig) -> Any:
    """Load the tokenizer named by the config; remote code is never enabled."""

    kwargs = dict(config.tokenizer_kwargs or {})
    kwargs["trust_remote_code"] = False
    return AutoTokenizer.from_pretrained(config.tokenizer_name_or_path, **kwargs)


def initial_prompt(
    config: PromptTuningConfig,
    embed: nn.Module,
    tokenizer: Any | None = None,
    model_config: Any | None = None,
) -> torch.Tensor:
    """The starting matrix for `config`, `(total_virtual_tokens, hidden)` float32.

    Args:
        config: A resolved config (num_transformer_submodules filled in).
        embed: The base model's input embedding module.
        tokenizer: Tokenizer for TEXT / CLASS_LABELS, and to exclude special tokens from
            sampling; loaded from `config.tokenizer_name_or_path` when absent. Without
            any tokenizer, sampling excludes the special ids the model config names.
        model_config: The base model's config, for its special token ids.
    """
    total = config.total_virtual_tokens
    init = config.prompt_tuning_init
    if tokenizer is None and config.tokenizer_name_or_path and init is not PromptTuningInit.RANDOM:
        tokenizer = load_init_tokenizer(config)
    excluded = special_token_ids(tokenizer, model_config)
    if init is PromptTuningInit.TEXT:
        return init_text(total, embed, tokenizer, config.prompt_tuning_init_text)
    candidates = candidate_ids(embed, tokenizer, excluded)
    if init is PromptTuningInit.CLASS_LABELS:
        n = config.num_virtual_tokens
        blocks = [
            init_class_labels(n, embed, tokenizer, config.prompt_tuning_init_text, candidates)
            for _ in range(config.num_transformer_submodules or 1)
        ]
        return torch.cat(blocks)
    if init is PromptTuningInit.SAMPLE_VOCAB:
        return init_sample_vocab(total, embed, candidates)
    return init_random(total, embed, candidates)
