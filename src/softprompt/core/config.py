"""Configuration of a soft prompt: what it is, how it starts, how it is stored.

`PromptTuningConfig` follows PEFT's prompt-tuning configuration field for field so that
`adapter_config.json` files written by either library load in the other, but it is
strict: every value is checked when the object is built and a wrong one raises a
`ValueError` (or `TypeError` for a value of the wrong type) that names the field, the
value received, what was expected and how to fix it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

logger = logging.getLogger(__name__)


def _show(value: Any, limit: int = 200) -> str:
    """`repr(value)` for an error message: shortened, and never itself an error (Python
    refuses to print integers of over 4,300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<a {type(value).__name__} too large to print>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


PEFT_TYPE = "PROMPT_TUNING"

# Upper bounds that no real model reaches; they stop a hostile or mistyped
# configuration from allocating absurd amounts of memory before any check runs.
MAX_VIRTUAL_TOKENS = 65_536
MAX_DIM = 1 << 20
MAX_LAYERS = 10_000
# Deepest nesting accepted in JSON-valued fields; a real config nests two or three levels.
# The limit keeps hostile documents from exhausting the stack (RecursionError) when the
# values are checked, copied or written back.
MAX_JSON_DEPTH = 64


class _StrEnum(str, Enum):
    """A str Enum that accepts its values case-insensitively and lists them on error."""

    @classmethod
    def parse(cls, value: Any, field_name: str) -> _StrEnum:
        if isinstance(value, cls):
            return value
        if not isinstance(value, str):
            raise TypeError(
                f"{field_name} must be a string, one of {cls.choices()}; got {_show(value)} "
                f"of type {type(value).__name__}."
            )
        key = value.strip().upper().replace("-", "_")
        for member in cls:
            if member.value == key:
                return member
        raise ValueError(
            f"Unknown {field_name} {_show(value)}. Valid values are: {', '.join(cls.choices())}."
        )

    @classmethod
    def choices(cls) -> list[str]:
        return [m.value for m in cls]

    def __str__(self) -> str:
        return self.value


class PromptTuningInit(_StrEnum):
    """How the virtual-token embeddings start.

    - ``TEXT``: the token embeddings of ``prompt_tuning_init_text``, repeated or cut
      to ``num_virtual_tokens`` (needs a tokenizer).
    - ``CLASS_LABELS``: one position per label word in ``prompt_tuning_init_text``
      (a list; a multi-token word is the mean of its token embeddings), the remaining
      positions sampled from the vocabulary (Lester et al., 2021; needs a tokenizer).
    - ``SAMPLE_VOCAB``: embeddings of random vocabulary tokens, never special or
      padding tokens.
    - ``RANDOM``: Gaussian vectors with the per-dimension mean and standard deviation
      of the model's embedding table (see `softprompt.core.init.init_random`).
    """

    TEXT = "TEXT"
    CLASS_LABELS = "CLASS_LABELS"
    SAMPLE_VOCAB = "SAMPLE_VOCAB"
    RANDOM = "RANDOM"


class PromptPosition(_StrEnum):
    """Where an adapter's virtual tokens go in the input.

    - ``PREFIX``: in front of the input (PEFT's prompt tuning; the default).
    - ``MARKER``: at a per-row index inside the input, given with every call as
      `prompt_positions` (see `softprompt.scoring.compose.tokenize_template` for templates such as
      ``"Review: {text}\n{prompt}Sentiment:"``). PEFT ignores this key when it loads the
      file, so a PEFT-loaded adapter is a prefix.
    """

    PREFIX = "PREFIX"
    MARKER = "MARKER"


class TaskType(_StrEnum):
    """What the wrapped model does; decides how inputs, labels and outputs are adjusted."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


# Keys PEFT writes for prompt tuning that carry no meaning here.
_PEFT_BOOKKEEPING_KEYS = {"peft_type", "peft_version", "auto_mapping"}


def _check_int(name: str, value: Any, *, low: int, high: int, required: bool) -> int | None:
    if value is None:
        if required:
            raise ValueError(f"{name} is required: pass a positive integer, for example {name}=20.")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            value = int(value)
        else:
            raise TypeError(f"{name} must be an integer; got {_show(value)} of type {type(value).__name__}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}; got {_show(value)}.")
    return value


def _check_str(name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(
            f"{name} must be a string or None; got {_show(value)} of type {type(value).__name__}."
        )
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL characters; got {_show(value)}.")
    return value


def _find_remote_code(value: Any, path: str) -> str | None:
    """Return the key path of any `trust_remote_code` entry inside nested dicts/lists."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and k.strip().lower() == "trust_remote_code":
                return f"{path}[{_show(k)}]"
            found = _find_remote_code(v, f"{path}[{_show(k)}]")
            if found:
                return found
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _find_remote_code(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _check_json_data(name: str, value: Any, *, strict: bool = True) -> None:
    """Raise unless `value` can be written to `adapter_config.json` and read back.

    That is dicts with string keys, lists, strings, numbers, booleans and None, nested at
    most `MAX_JSON_DEPTH` levels (checked without recursion). `strict` also refuses NaN and
    infinities and anything JSON would give back changed (tuples, integer keys); it is off
    for unknown keys read from a file, which Python's json module wrote and reads back.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(
                f"{name} is nested more than {MAX_JSON_DEPTH} levels deep; a configuration value never is."
            )
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
    what = "plain JSON data (strings, finite numbers, booleans, None, lists, dicts with string keys)"
    try:
        text = json.dumps(value, allow_nan=not strict)
    except (TypeError, ValueError) as err:  # bytes, sets, NaN, integers too long to write
        raise type(err)(f"{name} must hold {what}; {err}.") from None
    if strict and json.loads(text) != value:
        raise TypeError(f"{name} must hold {what}; {_show(value)} would not read back the same from JSON.")


@dataclass
class PromptTuningConfig:
    """Configuration of one soft prompt (one adapter).

    Args:
        task_type: What the model does (`TaskType` or its name). None: inferred from the
            model class when the prompt is attached (`wrap`).
        num_virtual_tokens: Number of virtual tokens N, the prompt length (required).
        token_dim: Hidden size of the model's input embeddings; filled in from the model.
        num_transformer_submodules: 1, or 2 for encoder-decoder LMs where PEFT stores a
            second block of N rows that prompt tuning never uses; filled in from the task.
        num_attention_heads: Filled in from the model (kept for PEFT compatibility).
        num_layers: Filled in from the model (kept for PEFT compatibility).
        base_model_name_or_path: The model the prompt was trained on (informational).
        revision: Revision of that model (informational).
        inference_mode: True in saved files; a prompt loaded for inference is frozen.
        prompt_tuning_init: How the prompt starts, a `PromptTuningInit` or its name.
        prompt_tuning_init_text: TEXT: the text. CLASS_LABELS: the list of label words.
        tokenizer_name_or_path: Tokenizer for TEXT and CLASS_LABELS initialisation.
        tokenizer_kwargs: Extra arguments for `AutoTokenizer.from_pretrained` (TEXT and
            CLASS_LABELS only; `trust_remote_code` is refused).
        modules_to_save: Heads trained and saved with the prompt. None: the task's new
            head (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) is trained; [] freezes it.
        prompt_position: Where the prompt goes, a `PromptPosition` or its name: ``PREFIX``
            (in front of the input) or ``MARKER`` (at `prompt_positions` given per call).
            Not a PEFT field: written to `adapter_config.json` only when not PREFIX.
    """

    task_type: TaskType | str | None = None
    num_virtual_tokens: int | None = None
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | list[str] | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict[str, Any] | None = None
    modules_to_save: list[str] | None = None
    prompt_position: PromptPosition | str = PromptPosition.PREFIX
    peft_type: str = field(default=PEFT_TYPE, repr=False)

    def __post_init__(self) -> None:
        if self.peft_type != PEFT_TYPE:
            raise ValueError(
                f"peft_type must be {_show(PEFT_TYPE)} (softprompt only does prompt tuning); got "
                f"{_show(self.peft_type)}. An adapter of another PEFT method cannot be loaded here."
            )
        if self.task_type is not None:
            self.task_type = TaskType.parse(self.task_type, "task_type")
        self.num_virtual_tokens = _check_int(
            "num_virtual_tokens", self.num_virtual_tokens, low=1, high=MAX_VIRTUAL_TOKENS, required=True
        )
        self.token_dim = _check_int("token_dim", self.token_dim, low=1, high=MAX_DIM, required=False)
        self.num_transformer_submodules = _check_int(
            "num_transformer_submodules", self.num_transformer_submodules, low=1, high=2, required=False
        )
        self.num_attention_heads = _check_int(
            "num_attention_heads", self.num_attention_heads, low=1, high=MAX_DIM, required=False
        )
        self.num_layers = _check_int("num_layers", self.num_layers, low=1, high=MAX_LAYERS, required=False)
        self.base_model_name_or_path = _check_str("base_model_name_or_path", self.base_model_name_or_path)
        self.revision = _check_str("revision", self.revision)
        self.tokenizer_name_or_path = _check_str("tokenizer_name_or_path", self.tokenizer_name_or_path)
        if not isinstance(self.inference_mode, bool):
            raise TypeError(f"inference_mode must be true or false; got {_show(self.inference_mode)}.")
        self.prompt_tuning_init = PromptTuningInit.parse(self.prompt_tuning_init, "prompt_tuning_init")
        self._check_init()
        self._check_modules_to_save()
        self.prompt_position = PromptPosition.parse(self.prompt_position, "prompt_position")

    def _check_init(self) -> None:
        init = self.prompt_tuning_init
        text = self.prompt_tuning_init_text
        needs_tokenizer = init in (PromptTuningInit.TEXT, PromptTuningInit.CLASS_LABELS)
        if init is PromptTuningInit.TEXT:
            if not isinstance(text, str):
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs prompt_tuning_init_text, a non-empty string such as "
                    f"'Classify the sentiment:'; got {_show(text)}."
                )
            if not text.strip():
                raise ValueError(
                    f"prompt_tuning_init_text is empty ({_show(text)}): "
                    "TEXT initialisation needs at least one "
                    "token. Give some text, or use prompt_tuning_init='SAMPLE_VOCAB'."
                )
        elif init is PromptTuningInit.CLASS_LABELS:
            if isinstance(text, str) or not isinstance(text, (list, tuple)) or not text:
                raise ValueError(
                    "prompt_tuning_init='CLASS_LABELS' needs prompt_tuning_init_text as a non-empty list of "
                    f"label words, for example ['positive', 'negative']; got {_show(text)}."
                )
            bad = [w for w in text if not isinstance(w, str) or not w.strip()]
            if bad:
                raise ValueError(
                    "prompt_tuning_init_text holds empty or non-string label words "
                    f"{_show(bad)}; every label word must be a non-empty string."
                )
            if len(text) > self.num_virtual_tokens:
                raise ValueError(
                    f"{len(text)} label words do not fit in num_virtual_tokens={self.num_virtual_tokens}: "
                    "each label word takes one virtual token. Raise num_virtual_tokens or give fewer labels."
                )
            self.prompt_tuning_init_text = list(text)
        elif text is not None and (
            not isinstance(text, (str, list))
            or (isinstance(text, list) and not all(isinstance(w, str) for w in text))
        ):
            raise TypeError(
                f"prompt_tuning_init_text must be a string, a list of strings or None; got {_show(text)}."
            )
        if needs_tokenizer and not self.tokenizer_name_or_path:
            raise ValueError(
                f"prompt_tuning_init={_show(init.value)} needs tokenizer_name_or_path, "
                "the tokenizer of the base "
                f"model (a hub id or a local folder); got {_show(self.tokenizer_name_or_path)}."
            )
        if self.tokenizer_kwargs is not None:
            if not needs_tokenizer:
                raise ValueError(
                    f"tokenizer_kwargs only applies to TEXT and CLASS_LABELS initialisation, but "
                    f"prompt_tuning_init is {_show(init.value)}. Remove tokenizer_kwargs."
                )
            if not isinstance(self.tokenizer_kwargs, dict) or not all(
                isinstance(k, str) for k in self.tokenizer_kwargs
            ):
                raise TypeError(
                    f"tokenizer_kwargs must be a dict with string keys; got {_show(self.tokenizer_kwargs)}."
                )
            _check_json_data("tokenizer_kwargs", self.tokenizer_kwargs)  # before the recursive search below
            found = _find_remote_code(self.tokenizer_kwargs, "tokenizer_kwargs")
            if found:
                raise ValueError(
                    f"{found} is refused: softprompt never runs code from a tokenizer or a configuration "
                    "file. Remove trust_remote_code from tokenizer_kwargs."
                )

    def _check_modules_to_save(self) -> None:
        mts = self.modules_to_save
        if mts is None:
            return
        if isinstance(mts, str) or not isinstance(mts, (list, tuple)):
            raise TypeError(f"modules_to_save must be a list of module names or None; got {_show(mts)}.")
        for name in mts:
            if not isinstance(name, str) or not name or ".." in name or name.startswith("."):
                raise ValueError(
                    f"modules_to_save holds {_show(name)}, which is not a module name such as 'score' or "
                    "'classifier'."
                )
        # PEFT writes duplicates ("classifier", "score", "classifier", "score"); keep order, drop repeats.
        self.modules_to_save = list(dict.fromkeys(mts))

    # ------------------------------------------------------------------ derived values
    @property
    def total_virtual_tokens(self) -> int:
        """Rows stored in the prompt matrix: num_virtual_tokens * num_transformer_submodules."""
        return self.num_virtual_tokens * (self.num_transformer_submodules or 1)

    def replace(self, **changes: Any) -> PromptTuningConfig:
        """A validated copy with some fields changed; the original is left untouched."""
        # JSON-valued fields are deep-copied so no two configs share a mutable value.
        for name in ("tokenizer_kwargs", "prompt_tuning_init_text", "modules_to_save"):
            if name not in changes and isinstance(getattr(self, name), (list, dict)):
                changes[name] = copy.deepcopy(getattr(self, name))
        new = dataclasses.replace(self, **changes)
        new._unknown = copy.deepcopy(getattr(self, "_unknown", {}))
        return new

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """The PEFT-compatible dictionary written to `adapter_config.json`."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "prompt_position" and value is PromptPosition.PREFIX:
                continue  # PEFT's files (and ours for a prefix) stay free of keys PEFT warns about
            if isinstance(value, Enum):
                value = value.value
            elif isinstance(value, (list, dict)):
                value = json.loads(json.dumps(value))  # deep copy of plain JSON data
            out[f.name] = value
        out.update(getattr(self, "_unknown", {}))
        return out

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "configuration") -> PromptTuningConfig:
        """Build a config from a PEFT-style dict.

        PEFT's bookkeeping keys (`peft_version`, `auto_mapping`) are accepted; keys this
        version does not know (from a newer PEFT, say) are kept, written back on save and
        reported with a warning, never a crash.
        """
        if not isinstance(data, dict):
            raise TypeError(f"{source} must be a JSON object; got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        unknown = {k: v for k, v in data.items() if k not in known and k not in _PEFT_BOOKKEEPING_KEYS}
        if "peft_type" in data and data["peft_type"] != PEFT_TYPE:
            raise ValueError(
                f"{source}: peft_type is {_show(data['peft_type'])}, but softprompt only loads "
                f"{_show(PEFT_TYPE)} adapters."
            )
        for key, value in unknown.items():
            _check_json_data(f"{source}: key {_show(key)}", value, strict=False)
        if unknown:
            logger.warning(
                "%s: ignoring unknown keys %s (written by a newer PEFT?); they are kept when saving.",
                source,
                sorted(unknown),
            )
        try:
            config = cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{source}: {err}") from None
        config._unknown = unknown
        return config

    @classmethod
    def from_json_string(cls, text: str, *, source: str = "configuration") -> PromptTuningConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON: {err}") from None
        except (ValueError, RecursionError) as err:  # an integer too long to convert; nesting past the stack
            raise ValueError(f"{source} is not usable JSON ({type(err).__name__}: {err}).") from None
        return cls.from_dict(data, source=source)
