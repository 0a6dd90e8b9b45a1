"""What softprompt needs to know about a transformers model, found out in one place."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

import torch
from torch import nn

from .config import TaskType
from .layout import PositionStyle


@lru_cache(maxsize=256)
def _forward_params(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes an argument called `name`."""
    return name in _forward_params(type(model))


def cache_kwarg(model: nn.Module) -> str:
    """The name under which this transformers version passes the KV cache."""
    return "cache" if accepts(model, "cache") else "past_key_values"


def is_causal_decoder(model: nn.Module) -> bool:
    """A decoder-only model whose attention is causal (GPT-2, Llama...), as opposed to an
    encoder (BERT) or an encoder-decoder (T5)."""
    if is_encoder_decoder(model):
        return False
    return any(getattr(m, "is_causal", False) is True for m in model.modules())


def position_style(model: nn.Module) -> PositionStyle:
    """How to tell `model` where each token is (see `softprompt.layout`)."""
    compact = not is_causal_decoder(model)
    if not accepts(model, "position_ids"):
        return PositionStyle(pass_ids=False, compact=compact)
    # RoBERTa-style embeddings count positions from padding_idx + 1.
    for module in model.modules():
        if hasattr(module, "create_position_ids_from_inputs_embeds") and hasattr(module, "padding_idx"):
            pad = int(module.padding_idx)
            return PositionStyle(compact=compact, offset=pad + 1, pad_value=pad)
    return PositionStyle(compact=compact)


def infer_task_type(model: nn.Module) -> TaskType | None:
    """Guess the task from the model class name (`LlamaForCausalLM` -> CAUSAL_LM)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return TaskType.CAUSAL_LM
    if name.endswith(("ForConditionalGeneration", "ForSeq2SeqLM")) and getattr(
        config, "is_encoder_decoder", False
    ):
        return TaskType.SEQ_2_SEQ_LM
    if name.endswith("ForSequenceClassification"):
        return TaskType.SEQ_CLS
    if name.endswith("ForTokenClassification"):
        return TaskType.TOKEN_CLS
    if name.endswith("ForQuestionAnswering"):
        return TaskType.QUESTION_ANS
    if name.endswith(("Model", "EncoderModel")) and "For" not in name:
        return TaskType.FEATURE_EXTRACTION
    return None


def is_encoder_decoder(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def hidden_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings()
    return int(emb.weight.shape[1])


def describe_model(model: nn.Module) -> dict[str, int | None]:
    """token_dim, num_layers and num_attention_heads as PEFT records them."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config

    def first(*names: str) -> int | None:
        for n in names:
            value = getattr(text, n, None)
            if isinstance(value, int):
                return value
        return None

    return {
        "token_dim": hidden_size(model),
        "num_layers": first("num_hidden_layers", "num_layers", "n_layer"),
        "num_attention_heads": first("num_attention_heads", "num_heads", "n_head"),
    }


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


@contextmanager
def attention_implementation(model: nn.Module, name: str | None) -> Iterator[None]:
    """Run the block with transformers attention implementation `name` ("eager", "sdpa"...),
    then restore the model's own. A no-op for `None`, for the current implementation, and
    for models that cannot switch."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if name is None or current is None or current == name or can_switch is None or not can_switch():
        yield
        return
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


EAGER_MAX_TOKENS = 512


def resolve_bf16(setting: bool | None, device: torch.device) -> bool:
    """A bf16 option as given (True/False), or for None whether `device` has native bfloat16."""
    return native_bf16(device) if setting is None else bool(setting)


def training_attention(model: nn.Module, bf16: bool, device: torch.device, positions: int) -> str | None:
    """The attention implementation for a training batch of `positions` per row (prompt
    included): "eager" for bfloat16 on CPU, None (the model's own) otherwise.

    PyTorch's CPU flash-attention backward is slow in bfloat16; plain matmul attention
    uses the CPU's bfloat16 units and made a SmolLM2-135M training step about 30% faster
    (1.25 s against 1.81 s for 16 reviews, 50 virtual tokens). Only rows of at most
    `EAGER_MAX_TOKENS` positions get it, where eager's L×L score matrices stay small.
    """
    if not bf16 or device.type != "cpu" or positions > EAGER_MAX_TOKENS:
        return None
    return (
        "eager" if getattr(getattr(model, "config", None), "_attn_implementation", None) == "sdpa" else None
    )


# ---------------------------------------------------------------------- prefix attention
PREFIX_ATTENTION = "softprompt_sdpa"
_GQA_IN_SDPA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)  # enable_gqa
# Attention arguments that change the computation beyond a plain masked softmax.
_SPECIAL_ATTENTION = ("softcap", "position_bias", "s_aux", "sinks", "output_attentions", "head_mask")


def _prefix_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, except that grouped-query attention with a mask on CPU
    runs on the key/value heads as they are (`enable_gqa`) instead of copying them to every
    query head: a cached prompt always brings a mask (its queries and keys differ in
    length), and the copies and their backward cost about a quarter of the attention time."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    plain = not any(
        kwargs.get(name) is not None and kwargs.get(name) is not False for name in _SPECIAL_ATTENTION
    )
    if (
        plain
        and attention_mask is not None
        and query.device.type == "cpu"
        and query.shape[2] > 1
        and key.shape[1] != query.shape[1]
    ):
        out = torch.nn.functional.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=float(kwargs.get("dropout", 0.0) or 0.0),
            scale=kwargs.get("scaling"),
            enable_gqa=True,
        )
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


@lru_cache(maxsize=1)
def _register_prefix_attention() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    except ImportError:
        return False
    AttentionInterface.register(PREFIX_ATTENTION, _prefix_sdpa)
    AttentionMaskInterface.register(PREFIX_ATTENTION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return True


def prefix_attention(model: nn.Module, device: torch.device) -> str | None:
    """The attention implementation for a forward pass that starts from a cached prompt:
    `PREFIX_ATTENTION` for grouped-query sdpa models on CPU (see `_prefix_sdpa`), else None
    (the model's own)."""
    config = getattr(model, "config", None)
    if device.type != "cpu" or not _GQA_IN_SDPA or getattr(config, "_attn_implementation", None) != "sdpa":
        return None
    heads, kv_heads = (
        getattr(config, "num_attention_heads", None),
        getattr(config, "num_key_value_heads", None),
    )
    if not heads or not kv_heads or kv_heads == heads:
        return None
    return PREFIX_ATTENTION if _register_prefix_attention() else None


# ---------------------------------------------------------------------- bf16 weight copies
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
