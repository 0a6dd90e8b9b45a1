"""Property-based tests: hostile configuration values, JSON text and damaged adapter folders.

Every property has the same shape: the code under test either gives a usable result that
keeps its promises (round trips, finite tensors of the described shape) or raises the
documented error (`ValueError`/`TypeError`, `AdapterFileError`) with a message that says
where the problem is. Any other exception is a bug.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import random
import tempfile
from enum import Enum
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from softprompt import AdapterFileError, PromptTuningConfig, PromptTuningInit, TaskType, wrap
from softprompt.core.adapter_files import CONFIG_NAME, META_DIGEST, PROMPT_KEY, WEIGHTS_NAME, read_adapter
from softprompt.core.config import MAX_VIRTUAL_TOKENS, PromptPosition
from tests.tiny import build_model

FIELDS = [f.name for f in dataclasses.fields(PromptTuningConfig)]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _strict_json(text: str):
    """json.loads that refuses NaN/Infinity, which are not JSON."""

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _assert_documented_error(err: BaseException, *, names: list[str] | None = None) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"{type(err).__name__}: {err}"
    message = str(err)
    assert message.strip(), f"{type(err).__name__} without a message"
    if names is not None:
        assert any(name in message for name in names), f"message names none of {names}: {message}"


# ---------------------------------------------------------------------- value strategies
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# Python's json module also reads and writes NaN and Infinity.
json_values_nan = st.recursive(
    _scalars | st.floats(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _remote_code(inner):
    key = st.sampled_from(["trust_remote_code", "Trust_Remote_Code", " TRUST_REMOTE_CODE "])
    return st.one_of(
        st.dictionaries(key, inner, min_size=1, max_size=1),
        st.builds(lambda k, v, x: {"nested": [x, {k: v}]}, key, inner, inner),
    )


hostile_json = st.one_of(  # wrong values that JSON can carry
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**62, max_value=2**256) | st.integers(min_value=-(2**256), max_value=-1),
    st.floats(),  # nan, inf, -0.0, huge
    st.sampled_from([1.0, 4.0, 2.5, 1e300, float("nan"), float("inf")]),
    st.sampled_from(
        ["", " ", "\x00", "TEXT\x00", "causal_lm", "CAUSAL-LM", "RANDOM ", "ü", "🙂", "\u202e", "a" * 1000]
    ),
    st.text(max_size=12),
    st.lists(st.one_of(st.text(max_size=5), st.integers(), st.none()), max_size=4),
    st.dictionaries(st.text(max_size=6), json_values_nan, max_size=3),
    _remote_code(json_values),
)
hostile = st.one_of(  # ... and Python values no file holds
    hostile_json,
    st.binary(max_size=8),
    st.lists(st.one_of(st.text(max_size=3), st.binary(max_size=2), st.floats()), min_size=1, max_size=3),
    st.dictionaries(
        st.text(max_size=4),
        st.binary(max_size=2) | st.tuples(st.integers()) | st.just(float("nan")),
        min_size=1,
        max_size=2,
    ),
    st.tuples(st.text(max_size=4)),
    st.dictionaries(st.integers(), st.integers(), min_size=1, max_size=2),
    st.just(set()),
)

_names = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=20)
_nonblank = st.text(max_size=20).map(lambda s: s if s.strip() else s + "w")
_module_names = st.lists(
    st.sampled_from(["score", "classifier", "lm_head", "qa_outputs", "model.norm"]), max_size=4
)
_safe_keys = st.text(max_size=8).filter(lambda k: k.strip().lower() != "trust_remote_code")
_tokenizer_kwargs = st.dictionaries(
    _safe_keys,
    st.recursive(
        st.one_of(
            st.none(),
            st.booleans(),
            st.integers(),
            st.floats(allow_nan=False, allow_infinity=False),
            st.text(max_size=6),
        ),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_safe_keys, inner, max_size=3),
        max_leaves=8,
    ),
    max_size=3,
)


def _enum_spellings(enum):
    values = [m.value for m in enum]
    return st.one_of(
        st.sampled_from(list(enum)),
        st.sampled_from(
            values
            + [v.lower() for v in values]
            + [v.replace("_", "-") for v in values]
            + [f" {v} " for v in values]
        ),
    )


VALID = {
    "task_type": st.none() | _enum_spellings(TaskType),
    "num_virtual_tokens": st.integers(1, 64)
    | st.integers(1, MAX_VIRTUAL_TOKENS)
    | st.sampled_from([1.0, 20.0]),
    "token_dim": st.none() | st.integers(1, 8192),
    "num_transformer_submodules": st.sampled_from([None, 1, 2]),
    "num_attention_heads": st.none() | st.integers(1, 128),
    "num_layers": st.none() | st.integers(1, 10_000),
    "base_model_name_or_path": st.none() | _names,
    "revision": st.none() | _names,
    "inference_mode": st.booleans(),
    "prompt_tuning_init": _enum_spellings(PromptTuningInit),
    "prompt_tuning_init_text": st.none() | st.text(max_size=20) | st.lists(_nonblank, max_size=4),
    "tokenizer_name_or_path": st.none() | _names,
    "tokenizer_kwargs": st.none() | _tokenizer_kwargs,
    "modules_to_save": st.none() | _module_names,
    "prompt_position": _enum_spellings(PromptPosition),
    "peft_type": st.just("PROMPT_TUNING"),
}
assert sorted(VALID) == sorted(FIELDS)

# A valid list or dict with one value that JSON cannot hold (or would give back changed).
_bad_leaf = st.one_of(
    st.binary(max_size=2),
    st.sampled_from([float("nan"), float("inf"), 10**4400, (1,), frozenset()]),
    st.builds(object),
)


@st.composite
def _with_bad_item(draw, items):
    values = draw(items)
    values.insert(draw(st.integers(0, len(values))), draw(_bad_leaf))
    return values


@st.composite
def _dict_with_bad_value(draw):
    value = draw(_tokenizer_kwargs)
    bad = draw(_bad_leaf)
    value[draw(_safe_keys)] = draw(st.sampled_from([bad, [bad], {"k": bad}, {"k": [1, {"j": bad}]}]))
    return value if draw(st.sampled_from([True] * 4 + [False])) else {**value, 1: "integer key"}


NEAR_VALID = {
    "prompt_tuning_init_text": _with_bad_item(st.lists(_nonblank, max_size=3)),
    "modules_to_save": _with_bad_item(_module_names)
    | st.lists(st.sampled_from(["", ".", "..", ".score", "a..b"]), min_size=1),
    "tokenizer_kwargs": _dict_with_bad_value(),
}


@st.composite
def valid_configs(draw):
    """Configs that follow every documented rule; building them must succeed."""
    init = draw(st.sampled_from(list(PromptTuningInit)))
    n = draw(st.integers(1, 64))
    kwargs = {
        name: draw(VALID[name])
        for name in FIELDS
        if name not in ("prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs")
    }
    kwargs.update(num_virtual_tokens=n, prompt_tuning_init=init)
    if init is PromptTuningInit.TEXT:
        kwargs["prompt_tuning_init_text"] = draw(_nonblank)
    elif init is PromptTuningInit.CLASS_LABELS:
        kwargs["prompt_tuning_init_text"] = draw(st.lists(_nonblank, min_size=1, max_size=n))
    else:
        kwargs["prompt_tuning_init_text"] = draw(VALID["prompt_tuning_init_text"])
    if init in (PromptTuningInit.TEXT, PromptTuningInit.CLASS_LABELS):
        kwargs["tokenizer_name_or_path"] = draw(_names.filter(bool))
        kwargs["tokenizer_kwargs"] = draw(VALID["tokenizer_kwargs"])
    else:
        kwargs["tokenizer_name_or_path"] = draw(VALID["tokenizer_name_or_path"])
    return kwargs


@st.composite
def config_kwargs(draw):
    """kwargs for PromptTuningConfig: a valid set with fields dropped, made hostile or swapped
    for another value that is valid on its own (breaking cross-field rules), plus unknown names."""
    kwargs = draw(valid_configs())
    # The fields that hold containers get more attention: that is where bad values hide.
    names = draw(st.lists(st.sampled_from(FIELDS + [*NEAR_VALID] * 4), min_size=1, max_size=3, unique=True))
    for name in names:
        change = draw(st.sampled_from(["drop", "hostile", "near", "near", "other"]))
        if change == "drop":
            kwargs.pop(name, None)
        elif change == "hostile":
            kwargs[name] = draw(hostile)
        elif change == "near":
            kwargs[name] = draw(NEAR_VALID.get(name, hostile))
        else:
            kwargs[name] = draw(VALID[name])
    if draw(st.sampled_from([False] * 9 + [True])):
        kwargs[
            draw(st.sampled_from(["peft_version", "lora_alpha", "r", "trust_remote_code", "Task_Type", ""]))
        ] = draw(hostile)
    return kwargs


def _freeze(value):
    """Containers by content, everything else by identity: detects in-place changes."""
    if isinstance(value, dict):
        return ("dict", tuple((_freeze(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        return (type(value).__name__, tuple(_freeze(v) for v in value))
    return ("atom", id(value))


def _assert_round_trips(config: PromptTuningConfig) -> None:
    data = config.to_dict()
    # prompt_position is not a PEFT field: written only when it is not the default PREFIX.
    assert set(FIELDS) - {"prompt_position"} <= set(data)
    assert ("prompt_position" in data) == (config.prompt_position is not PromptPosition.PREFIX)
    again = PromptTuningConfig.from_dict(data)
    assert again == config
    assert again.to_dict() == data
    text = config.to_json_string()
    assert _strict_json(text) == data
    from_text = PromptTuningConfig.from_json_string(text)
    assert from_text == config
    assert from_text.to_json_string() == text


# ---------------------------------------------------------------------- constructor
@SETTINGS
@given(config_kwargs())
def test_constructor_builds_a_round_tripping_config_or_raises_a_documented_error(kwargs):
    snapshot = _freeze(kwargs)
    try:
        config = PromptTuningConfig(**kwargs)
    except Exception as err:  # noqa: BLE001 - the property is about the exception type
        event(type(err).__name__)
        _assert_documented_error(err, names=FIELDS + list(kwargs))
    else:
        event("built")
        _assert_round_trips(config)
    # The caller's values are never changed in place.
    assert _freeze(kwargs) == snapshot


@settings(max_examples=100, deadline=None)
@given(valid_configs())
def test_valid_configs_are_accepted_and_round_trip(kwargs):
    config = PromptTuningConfig(**kwargs)
    assert config.num_virtual_tokens == int(kwargs["num_virtual_tokens"])
    _assert_round_trips(config)


@SETTINGS
@given(valid_configs(), st.sampled_from(FIELDS + ["unknown_field"]), st.data())
def test_replace_never_touches_the_original(kwargs, name, data):
    config = PromptTuningConfig(**kwargs)
    value = data.draw(
        st.one_of(hostile, VALID.get(name, st.integers(1, 64)), NEAR_VALID.get(name, st.nothing()))
    )
    before, before_json = copy.deepcopy(config), config.to_json_string()
    try:
        new = config.replace(**{name: value})
    except Exception as err:  # noqa: BLE001
        _assert_documented_error(err, names=FIELDS + [name])
    else:
        _assert_round_trips(new)
    assert config == before
    assert config.to_json_string() == before_json


@pytest.mark.parametrize(
    "kwargs",
    [
        {"prompt_tuning_init_text": [b"bytes"]},  # used to build, then fail in to_dict
        {"prompt_tuning_init_text": ["ok", 3]},
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "x",
            "tokenizer_name_or_path": "t",
            "tokenizer_kwargs": {"a": b"x"},
        },
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "x",
            "tokenizer_name_or_path": "t",
            "tokenizer_kwargs": {"a": float("nan")},
        },
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "x",
            "tokenizer_name_or_path": "t",
            "tokenizer_kwargs": {"a": {1: 2}},
        },
        {
            "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "x",
            "tokenizer_name_or_path": "t",
            "tokenizer_kwargs": {"a": (1, 2)},
        },
    ],
)
def test_values_that_cannot_be_saved_are_refused_when_building(kwargs):
    # Regression: these configs were accepted, then to_dict()/to_json_string() raised or
    # wrote something that read back different.
    with pytest.raises((TypeError, ValueError), match="prompt_tuning_init_text|tokenizer_kwargs"):
        PromptTuningConfig(num_virtual_tokens=4, **kwargs)


# ---------------------------------------------------------------------- JSON text
BASE_CONFIG = {
    "base_model_name_or_path": None,
    "inference_mode": True,
    "modules_to_save": [],
    "num_attention_heads": 4,
    "num_layers": 2,
    "num_transformer_submodules": 1,
    "num_virtual_tokens": 4,
    "peft_type": "PROMPT_TUNING",
    "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_text": None,
    "revision": None,
    "task_type": "CAUSAL_LM",
    "token_dim": 32,
    "tokenizer_kwargs": None,
    "tokenizer_name_or_path": None,
}
_any_json = json_values_nan | hostile_json


@st.composite
def mutated_config(draw, base=BASE_CONFIG):
    """A valid adapter_config.json dict with keys deleted, replaced and added."""
    data = dict(base)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["delete", "replace", "replace", "add"]))
        if op == "delete" and data:
            del data[draw(st.sampled_from(sorted(data)))]
        elif op == "replace":
            data[draw(st.sampled_from(FIELDS))] = draw(_any_json | VALID[draw(st.sampled_from(FIELDS))])
        else:
            data[
                draw(st.text(max_size=10) | st.sampled_from(["peft_version", "auto_mapping", "lora_alpha"]))
            ] = draw(_any_json)
    return data


def _jsonable(value):
    return value.value if isinstance(value, Enum) else value


def _dump(data) -> str:
    return json.dumps({k: _jsonable(v) for k, v in data.items()} if isinstance(data, dict) else data)


def _deep(depth: int, kind: str) -> str:
    return ("[" * depth + "]" * depth) if kind == "list" else ('{"k":' * depth + "1" + "}" * depth)


@st.composite
def config_texts(draw):
    """Text for from_json_string: arbitrary text, arbitrary JSON, mutated configs, deep nesting."""
    which = draw(st.sampled_from(["text", "json", "mutated", "mutated", "deep", "bigint"]))
    if which == "text":
        return draw(
            st.text(max_size=60) | st.sampled_from(["", "{", "}", "null", "[]", "NaN", "\ufeff{}", "{}" * 3])
        )
    if which == "json":
        return json.dumps(
            draw(
                json_values_nan
                | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), _any_json, max_size=6)
            )
        )
    if which == "mutated":
        return _dump(draw(mutated_config()))
    if which == "deep":
        depth = draw(st.integers(1, 3000) | st.sampled_from([63, 64, 65, 990, 1000, 100_000]))
        deep = _deep(depth, draw(st.sampled_from(["list", "dict"])))
        where = draw(
            st.sampled_from(
                ["top", "unknown", "tokenizer_kwargs", "prompt_tuning_init_text", "modules_to_save"]
            )
        )
        if where == "top":
            return deep
        data = dict(BASE_CONFIG)
        if where == "tokenizer_kwargs":
            data.update(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi", tokenizer_name_or_path="tok")
            return _dump(data)[:-1] + ', "tokenizer_kwargs": {"a": ' + deep + "}}"
        data.pop(where, None)
        return _dump(data)[:-1] + f', "{where if where != "unknown" else "x"}": ' + deep + "}"
    digits = draw(st.integers(4000, 5000))
    field = draw(st.sampled_from(["num_virtual_tokens", "token_dim", "unknown"]))
    data = {k: v for k, v in BASE_CONFIG.items() if k != field}
    return _dump(data)[:-1] + f', "{field}": ' + "7" * digits + "}"


@SETTINGS
@given(config_texts())
def test_from_json_string_gives_a_config_or_a_documented_error(text):
    try:
        config = PromptTuningConfig.from_json_string(text, source="fuzz.json")
    except Exception as err:  # noqa: BLE001
        event(type(err).__name__)
        _assert_documented_error(err, names=["fuzz.json"])
    else:
        event("built")
        out = config.to_json_string()  # never RecursionError, whatever was read
        again = PromptTuningConfig.from_json_string(out)
        assert again == config
        assert again.to_json_string() == out


@pytest.mark.parametrize(
    "text",
    [
        "[" * 100_000,  # RecursionError escaped from json.loads
        # Read fine, but writing it back from a deeper stack raised RecursionError.
        _dump(BASE_CONFIG)[:-1] + ', "x": ' + _deep(900, "list") + "}",
        _dump(
            {
                **BASE_CONFIG,
                "prompt_tuning_init": "TEXT",
                "prompt_tuning_init_text": "a",
                "tokenizer_name_or_path": "t",
            }
        )[:-1]
        + ', "tokenizer_kwargs": {"a": '
        + _deep(900, "dict")
        + "}}",  # RecursionError in the trust_remote_code search
        _dump({k: v for k, v in BASE_CONFIG.items() if k != "token_dim"})[:-1]
        + ', "token_dim": '
        + "9" * 5000
        + "}",
    ],
    ids=["unclosed-deep", "deep-unknown-key", "deep-tokenizer-kwargs", "5000-digit-int"],
)
def test_hostile_json_documents_raise_value_error_naming_the_source(text):
    # Regression: these raised RecursionError, or a ValueError that did not name the file.
    with pytest.raises(ValueError, match="fuzz.json"):
        PromptTuningConfig.from_json_string(text, source="fuzz.json")


# ---------------------------------------------------------------------- adapter folders
@dataclasses.dataclass
class Saved:
    config_bytes: bytes
    weights: bytes  # as save_pretrained wrote it: config and digest in the metadata
    weights_nometa: bytes  # the same tensors with metadata {"format": "pt"} only
    tensors: dict[str, torch.Tensor]
    config: dict
    digest: str


@pytest.fixture(scope="module")
def saved_adapters(tmp_path_factory) -> dict[str, Saved]:
    out = {}
    for task in ("CAUSAL_LM", "SEQ_CLS"):
        torch.manual_seed(0)
        model = wrap(build_model(task, "llama"), PromptTuningConfig(num_virtual_tokens=4))
        folder = tmp_path_factory.mktemp(task)
        model.save_pretrained(folder)
        tensors = load_file(folder / WEIGHTS_NAME)
        with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as fh:
            digest = fh.metadata()[META_DIGEST]
        save_file(tensors, folder / "nometa.safetensors", metadata={"format": "pt"})
        out[task] = Saved(
            config_bytes=(folder / CONFIG_NAME).read_bytes(),
            weights=(folder / WEIGHTS_NAME).read_bytes(),
            weights_nometa=(folder / "nometa.safetensors").read_bytes(),
            tensors=tensors,
            config=json.loads((folder / CONFIG_NAME).read_text()),
            digest=digest,
        )
    return out


_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
    "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "C64": 8, "F33": 4, "": 4, "f32": 4,
}  # fmt: skip


@st.composite
def new_header(draw):
    """A whole new safetensors file: header and data section, often inconsistent."""
    if draw(st.sampled_from([True] + [False] * 5)):  # not a JSON header at all
        raw = draw(st.binary(max_size=40))
        return len(raw).to_bytes(8, "little") + raw + draw(st.binary(max_size=16))
    rng = random.Random(draw(st.integers(0, 2**32)))
    header, chunks, offset = {}, [], 0
    names = draw(
        st.lists(
            st.sampled_from([PROMPT_KEY, PROMPT_KEY, "base_model.score.weight", "other", ""]),
            min_size=0,
            max_size=3,
            unique=True,
        )
    )
    for name in names:
        if name == PROMPT_KEY and draw(st.booleans()):  # the shape the config describes, any float dtype
            dtype, shape = draw(st.sampled_from(["F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"])), [4, 32]
        else:
            dtype = draw(st.sampled_from(sorted(_DTYPE_SIZES)))
            shape = draw(
                st.sampled_from([[4, 32], [8, 32], [4, 16], [3, 32], [4], [], [0, 32], [4, 32, 1]])
                | st.lists(st.integers(0, 8), max_size=3)
            )
        count = 1
        for dim in shape:
            count *= dim
        size = count * _DTYPE_SIZES[dtype]
        fill = draw(st.sampled_from(["zeros", "random", "huge"]))
        if fill == "zeros":  # finite in every dtype
            data = bytes(size)
        elif fill == "huge" and dtype == "F64":  # finite, but past float32's range
            data = (
                torch.full((count,), draw(st.sampled_from([1e300, -3.5e38, 3.4e38])), dtype=torch.float64)
                .numpy()
                .tobytes()
            )
        else:
            data = rng.randbytes(size)
        end = offset + size + draw(st.sampled_from([0, 0, 0, 1, -1]))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        chunks.append(data)
        offset += size
    meta = draw(st.sampled_from(["none", "format", "format", "config", "config", "digest", "not-a-string"]))
    if meta != "none":
        header["__metadata__"] = {"format": "pt"}
        if meta in ("config", "digest"):
            config = draw(st.just(BASE_CONFIG) | mutated_config())
            header["__metadata__"]["softprompt.core.config"] = _dump(config)
        if meta == "digest":
            header["__metadata__"][META_DIGEST] = f"{rng.getrandbits(256):064x}"
        if meta == "not-a-string":
            header["__metadata__"]["softprompt.core.config"] = {"num_virtual_tokens": 4}
    head = json.dumps(header).encode()
    if draw(st.booleans()):
        head += b" " * (-len(head) % 8)
    length = len(head) + draw(st.sampled_from([0, 0, 0, 1, -1, 10**6]))
    return length.to_bytes(8, "little") + head + b"".join(chunks)


# Edits of the existing JSON header, the data section kept: same-size reinterpretations
# (dtype, shape) load as far as the checks after safetensors' own.
_header_edits = st.lists(
    st.one_of(
        st.tuples(st.just("dtype"), st.integers(0, 3), st.sampled_from(sorted(_DTYPE_SIZES))),
        st.tuples(
            st.just("shape"),
            st.integers(0, 3),
            st.sampled_from([[8, 16], [32, 4], [128], [2, 64], [1, 4, 32], [4, 32], [8, 32], [96], [3, 32]]),
        ),
        st.tuples(
            st.just("rename"), st.integers(0, 3), st.sampled_from(["other", "base_model.x.weight", ""])
        ),
        st.tuples(st.just("offsets"), st.integers(0, 3), st.integers(-8, 8)),
        st.tuples(st.just("drop"), st.sampled_from([META_DIGEST, "softprompt.core.config", "format"])),
        st.tuples(st.just("config"), st.builds(_dump, mutated_config())),
    ),
    min_size=1,
    max_size=4,
)


def _edit_header(data: bytes, edits) -> bytes:
    size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + size])
        tensor_keys = sorted(k for k in header if k != "__metadata__")
    except (ValueError, TypeError):
        return data  # the header is already damaged beyond editing
    if not isinstance(header, dict) or not tensor_keys:
        return data
    meta = header.setdefault("__metadata__", {})
    for edit in edits:
        key = tensor_keys[edit[1] % len(tensor_keys)] if isinstance(edit[1], int) else None
        if key is not None and not isinstance(header.get(key), dict):
            continue
        if edit[0] == "dtype":
            header[key]["dtype"] = edit[2]
        elif edit[0] == "shape":
            header[key]["shape"] = edit[2]
        elif edit[0] == "offsets":
            header[key]["data_offsets"][1] += edit[2]
        elif edit[0] == "rename":
            header[edit[2]] = header.pop(key)
            tensor_keys = sorted(k for k in header if k != "__metadata__")
        elif edit[0] == "drop":
            meta.pop(edit[1], None)
        elif edit[0] == "config":
            meta["softprompt.core.config"] = edit[1]
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + data[8 + size :]


_weight_ops = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=12)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 64)),
    st.tuples(st.just("header"), new_header()),
    st.tuples(st.just("edit"), _header_edits),
)


def _mutate(data: bytes, ops) -> bytes:
    for op in ops:
        where = op[1] % (len(data) + 1) if isinstance(op[1], int) else 0
        if op[0] == "truncate":
            data = data[:where]
        elif op[0] == "flip" and data:
            where %= len(data)
            data = data[:where] + bytes([data[where] ^ (1 << op[2])]) + data[where + 1 :]
        elif op[0] == "insert":
            data = data[:where] + op[2] + data[where:]
        elif op[0] == "delete":
            data = data[:where] + data[where + op[2] :]
        elif op[0] == "header":
            data = op[1]
        elif op[0] == "edit":
            data = _edit_header(data, op[1])
    return data


@st.composite
def config_files(draw):
    """Bytes for adapter_config.json: valid, mutated, arbitrary JSON or text, or not UTF-8."""
    which = draw(st.sampled_from(["mutated", "mutated", "mutated", "json", "text", "bytes"]))
    if which == "mutated":
        return _dump(draw(mutated_config())).encode()
    if which == "json":
        return json.dumps(draw(json_values_nan)).encode()
    if which == "text":
        return draw(config_texts()).encode()
    return draw(st.binary(max_size=40)) + b"\xff"


def _check_read(folder: Path, saved: Saved, *, config_changed: bool, weights_changed: bool) -> None:
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    try:
        config, tensors = read_adapter(folder)
    except AdapterFileError as err:
        event("AdapterFileError")
        message = str(err)
        assert str(folder) in message, message
        if weights_changed and not config_changed:
            assert str(weights_path) in message, message
        else:
            assert str(config_path) in message or str(weights_path) in message, message
        return
    except Exception as err:
        raise AssertionError(
            f"read_adapter raised {type(err).__name__}, not AdapterFileError: {err}"
        ) from err
    event("loaded")
    prompt = tensors[PROMPT_KEY]
    assert prompt.dtype == torch.float32 and prompt.dim() == 2
    assert torch.isfinite(prompt).all()
    n, sub = config.num_virtual_tokens, config.num_transformer_submodules
    assert prompt.shape[0] == n * sub if sub else prompt.shape[0] in (n, 2 * n)
    if config.token_dim:
        assert prompt.shape[1] == config.token_dim
    for key, value in tensors.items():
        assert key == PROMPT_KEY or any(
            key.startswith(f"base_model.{m}.") for m in config.modules_to_save or []
        )
        if value.is_floating_point():
            assert torch.isfinite(value.float()).all()
    with safe_open(str(weights_path), framework="pt") as fh:
        digest = (fh.metadata() or {}).get(META_DIGEST)
    if not weights_changed or digest == saved.digest:
        # An intact file, or one whose stored checksum still vouches for the tensors.
        assert sorted(tensors) == sorted(saved.tensors)
        assert all(
            torch.equal(tensors[k], saved.tensors[k].float() if k == PROMPT_KEY else saved.tensors[k])
            for k in tensors
        )


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    task=st.sampled_from(["CAUSAL_LM", "SEQ_CLS"]),
    with_metadata=st.booleans(),
    config_file=st.none() | config_files(),
    ops=st.lists(_weight_ops, max_size=3),
)
def test_damaged_adapter_folder_loads_sanely_or_raises_adapter_file_error(
    saved_adapters, tmp_path_factory, task, with_metadata, config_file, ops
):
    saved = saved_adapters[task]
    assume(config_file is not None or ops)
    weights = _mutate(saved.weights if with_metadata else saved.weights_nometa, ops)
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        folder = Path(tmp) / "adapter"
        folder.mkdir()
        (folder / CONFIG_NAME).write_bytes(saved.config_bytes if config_file is None else config_file)
        (folder / WEIGHTS_NAME).write_bytes(weights)
        _check_read(folder, saved, config_changed=config_file is not None, weights_changed=bool(ops))


@SETTINGS
@given(config_file=config_files())
def test_stale_config_file_never_overrides_the_weights_own_copy(
    saved_adapters, tmp_path_factory, config_file
):
    # With the configuration stored in the weights file, a damaged adapter_config.json is
    # ignored (it is what an interrupted save leaves) unless it cannot even be read.
    saved = saved_adapters["CAUSAL_LM"]
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        folder = Path(tmp)
        (folder / CONFIG_NAME).write_bytes(config_file)
        (folder / WEIGHTS_NAME).write_bytes(saved.weights)
        try:
            config, tensors = read_adapter(folder)
        except AdapterFileError as err:
            assert str(folder / CONFIG_NAME) in str(err)
            assert not _is_utf8(config_file), "a readable config file must not stop the load"
        else:
            assert config.to_dict() == PromptTuningConfig.from_dict(saved.config).to_dict()
            assert torch.equal(tensors[PROMPT_KEY], saved.tensors[PROMPT_KEY])


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@SETTINGS
@given(
    dtype=st.sampled_from(
        [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2]
        + [torch.int32, torch.uint8, torch.bool]
    ),
    shape=st.sampled_from([(4, 32), (4, 32), (4, 32), (8, 32), (4, 16), (4,), (4, 32, 1), (0, 32)]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1.0, 1e-40, 6e4, 3e38, 1e300]) | st.floats(),
    special=st.none() | st.tuples(st.integers(0, 10**4), st.floats()),
)
def test_prompt_of_any_dtype_and_size_loads_finite_or_is_refused(
    saved_adapters, tmp_path_factory, dtype, shape, seed, scale, special
):
    # What the adapter_config.json describes: (4, 32). Values are checked in float32, where
    # they are used: a float64 prompt past float32's range must be refused, not turned to inf.
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    if special is not None and values.numel():
        values.view(-1)[special[0] % values.numel()] = special[1]
    tensor = values.to(dtype)
    with tempfile.TemporaryDirectory(dir=tmp_path_factory.getbasetemp()) as tmp:
        folder = Path(tmp)
        (folder / CONFIG_NAME).write_bytes(saved_adapters["CAUSAL_LM"].config_bytes)
        save_file({PROMPT_KEY: tensor}, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        as_float32 = tensor.to(torch.float32)
        fine = tensor.is_floating_point() and shape == (4, 32) and bool(torch.isfinite(as_float32).all())
        try:
            _, tensors = read_adapter(folder)
        except AdapterFileError as err:
            event("AdapterFileError")
            assert str(folder / WEIGHTS_NAME) in str(err)
            assert not fine, f"a finite {dtype} prompt of the right shape was refused: {err}"
        except Exception as err:
            raise AssertionError(f"read_adapter raised {type(err).__name__}: {err}") from err
        else:
            event("loaded")
            assert fine, f"loaded a {dtype} prompt of shape {shape} that is not finite in float32"
            assert tensors[PROMPT_KEY].dtype == torch.float32
            assert torch.equal(tensors[PROMPT_KEY], as_float32)


def test_intact_folders_load_both_ways(saved_adapters, tmp_path):
    # The baseline the fuzzed cases are measured against.
    for task, saved in saved_adapters.items():
        for weights in (saved.weights, saved.weights_nometa):
            folder = tmp_path / f"{task}-{len(weights)}"
            folder.mkdir()
            (folder / CONFIG_NAME).write_bytes(saved.config_bytes)
            (folder / WEIGHTS_NAME).write_bytes(weights)
            config, tensors = read_adapter(folder)
            assert config.num_virtual_tokens == 4 and torch.equal(
                tensors[PROMPT_KEY], saved.tensors[PROMPT_KEY]
            )


@pytest.mark.parametrize(
    "tensor",
    [torch.full((4, 32), 1e300, dtype=torch.float64), torch.zeros((4, 32), dtype=torch.float8_e4m3fn)],
    ids=["float64-past-float32-range", "float8-e4m3"],
)
def test_prompt_dtypes_are_checked_in_float32(saved_adapters, tmp_path, tensor):
    # Regression: 1e300 in float64 passed the finiteness check and loaded as inf; float8_e4m3
    # raised NotImplementedError from torch.isfinite.
    (tmp_path / CONFIG_NAME).write_bytes(saved_adapters["CAUSAL_LM"].config_bytes)
    save_file({PROMPT_KEY: tensor}, tmp_path / WEIGHTS_NAME, metadata={"format": "pt"})
    if tensor.dtype == torch.float64:
        with pytest.raises(AdapterFileError, match="NaN or infinite"):
            read_adapter(tmp_path)
    else:
        _, tensors = read_adapter(tmp_path)
        assert tensors[PROMPT_KEY].dtype == torch.float32 and not tensors[PROMPT_KEY].any()


def test_config_path_that_is_a_folder(saved_adapters, tmp_path):
    # Regression: IsADirectoryError escaped from read_adapter.
    (tmp_path / CONFIG_NAME).mkdir()
    (tmp_path / WEIGHTS_NAME).write_bytes(saved_adapters["CAUSAL_LM"].weights_nometa)
    with pytest.raises(AdapterFileError, match=CONFIG_NAME):
        read_adapter(tmp_path)
