"""What softprompt needs to know about a transformers model, found out in one place:
which arguments its forward takes, whether it is a causal decoder or an encoder-decoder,
how it numbers positions, which task its class implies and its sizes."""

from __future__ import annotations

import inspect
from functools import lru_cache

from torch import nn

from softprompt.core.config import TaskType
from softprompt.core.layout import PositionStyle
from softprompt.core.sharded_tensors import full_shape


@lru_cache(maxsize=256)
def forward_params(cls: type) -> frozenset[str]:
    """The argument names of `cls.forward` (cached per class)."""
    return frozenset(inspect.signature(cls.forward).parameters)


def accepts(model: nn.Module, name: str) -> bool:
    """Whether `model.forward` takes an argument called `name`."""
    return name in forward_params(type(model))


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
    """How to tell `model` where each token is (see `softprompt.core.layout`)."""
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
    """Whether the model's config says it is an encoder-decoder (T5, BART...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def hidden_size(model: nn.Module) -> int:
    """The width of the input embeddings (the prompt's hidden size)."""
    emb = model.get_input_embeddings()  # (a ZeRO-3 partitioned weight's own shape is (0,))
    return int(full_shape(emb.weight)[1])


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
