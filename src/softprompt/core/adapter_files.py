"""Adapter files in PEFT's format, written atomically and read defensively.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (tensor
`prompt_embeddings`, `(num_virtual_tokens * num_transformer_submodules, token_dim)`,
plus `base_model.<head>.<param>` for trained heads), exactly as PEFT writes them. A
legacy `adapter_model.bin` is read with `torch.load(weights_only=True)` only.

Writes: the weights file is replaced first, then the config, each by an atomic rename.
The weights file also carries, in its safetensors metadata, the configuration it belongs
to and a SHA-256 of its tensors. A save interrupted between the two renames therefore
leaves a folder whose weights file is complete and self-describing: the reader notices
the stale `adapter_config.json`, uses the configuration stored with the weights and says
so. Bit flips in a file we wrote are caught by the digest.

The metadata also records which base model the adapter was made for (`base_fingerprint`):
its architecture-defining config fields and a fixed sample of its embedding rows. Loading
onto a different base of the same width (where the shapes alone would not notice) is
refused unless `allow_base_mismatch=True`. PEFT reads only the tensors of the file, so
its files and ours stay interchangeable; files without a fingerprint (PEFT's, older
ones) load with a notice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from softprompt._io import atomic_write_bytes, atomic_write_text
from softprompt.core.config import PromptTuningConfig
from softprompt.core.heads import HeadSwitch, find_module
from softprompt.core.introspect import hidden_size

if TYPE_CHECKING:
    from softprompt.core.model import SoftPromptModel

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PROMPT_KEY = "prompt_embeddings"
HEAD_PREFIX = "base_model."
META_CONFIG = "softprompt.core.config"
META_DIGEST = "softprompt.sha256"
META_BASE = "softprompt.base"
MAX_CONFIG_BYTES = 1 << 20


class AdapterFileError(ValueError):
    """An adapter folder or file is missing, damaged or does not fit the model."""


class BaseModelMismatch(AdapterFileError):
    """The adapter was saved from a different base model (of the same width)."""


# ---------------------------------------------------------------------- base fingerprint
_ARCH_FIELDS = {
    "model_type": ("model_type",),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab_size": ("vocab_size",),
}
# Rows sampled from the input embeddings: fixed indices (those below the vocabulary size),
# so a resized vocabulary keeps its first rows' sample. Columns: 8 spread over the width.
_SAMPLE_ROWS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765)
_SAMPLE_COLUMNS = 8
# bf16 keeps 8 significant bits: a float32 base and its bf16 (or fp16) copy differ by at most
# 2^-8 relative per value; different bases differ by far more than 2^-6 almost everywhere.
_SAMPLE_RTOL = 2.0**-6
_SAMPLE_ATOL = 1e-5
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _text_config(base: Any) -> Any:
    config = base.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _arch_fields(base: Any) -> dict[str, Any]:
    config = _text_config(base)
    out: dict[str, Any] = {}
    for field_name, names in _ARCH_FIELDS.items():
        value = next((getattr(config, n) for n in names if getattr(config, n, None) is not None), None)
        out[field_name] = value if isinstance(value, (int, str)) else None
    if out["model_type"] is None:
        out["model_type"] = getattr(base.config, "model_type", None) or type(base).__name__
    return out


def base_fingerprint(base: Any) -> dict[str, Any] | None:
    """What identifies the base model an adapter is made for (cached per model object).

    A dict with `name_or_path` (informational), `config` (the architecture-defining config
    fields: model type, hidden size, layers, heads, vocabulary size), `sample` (hex of
    float32 little-endian bytes of `(rows, 8)` values sampled from the input embeddings at
    fixed rows and columns) and `fingerprint` (a short hash of both, for people). The
    sample is compared with a tolerance (see `same_base`), so a bf16 or fp16 copy of a
    float32 base, on any device, is the same base. None when the model has no readable
    input embeddings (a meta-device model, a table still sharded by FSDP).
    """

    embeddings = base.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type == "meta":
        return None
    if hasattr(weight, "placements"):  # a sharded DTensor: reading rows is a collective; see
        return None  # `distributed.gathered_input_embeddings`, which savers under FSDP wrap around this
    stamp = (id(weight), weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape), weight._version)
    cached = _FINGERPRINTS.get(base)
    if cached is not None and cached[0] == stamp:
        return dict(cached[1])
    rows = [r for r in _SAMPLE_ROWS if r < weight.shape[0]]
    width = weight.shape[1]
    columns = sorted({round(j * (width - 1) / (_SAMPLE_COLUMNS - 1)) for j in range(_SAMPLE_COLUMNS)})
    with torch.no_grad():
        index = torch.tensor(rows, device=weight.device)
        sample = weight.detach().index_select(0, index)[:, columns].to("cpu", torch.float32).contiguous()
    sample_bytes = np.ascontiguousarray(sample.numpy(), dtype="<f4").tobytes()
    fields = _arch_fields(base)
    config_text = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    # The short hash rounds the sample to bf16 first, so that it reads the same for a float32
    # base and its bf16 copy in most cases; the check itself compares values, not this hash.
    rounded = sample.to(torch.bfloat16).to(torch.float32).numpy().astype("<f4").tobytes()
    short = hashlib.sha256(config_text.encode() + b"|" + rounded).hexdigest()[:16]
    name = getattr(base.config, "_name_or_path", None) or getattr(base, "name_or_path", None) or ""
    result = {
        "config": fields,
        "fingerprint": short,
        "name_or_path": str(name),
        "sample": sample_bytes.hex(),
        "sample_shape": [len(rows), len(columns)],
    }
    _FINGERPRINTS[base] = (stamp, result)
    return dict(result)


def same_base(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether two fingerprints (see `base_fingerprint`) describe the same base model."""

    if saved.get("config") != current.get("config") or saved.get("sample_shape") != current.get(
        "sample_shape"
    ):
        return False
    try:
        a = np.frombuffer(bytes.fromhex(saved["sample"]), dtype="<f4").astype(np.float64)
        b = np.frombuffer(bytes.fromhex(current["sample"]), dtype="<f4").astype(np.float64)
    except (KeyError, TypeError, ValueError):
        return False
    if a.shape != b.shape:
        return False
    return bool(np.all(np.abs(a - b) <= _SAMPLE_ATOL + _SAMPLE_RTOL * np.maximum(np.abs(a), np.abs(b))))


def _describe_base(fp: dict[str, Any], other: dict[str, Any]) -> str:
    name = fp.get("name_or_path") or "(no name_or_path)"
    config, theirs = fp.get("config") or {}, other.get("config") or {}
    differ = {k: v for k, v in config.items() if theirs.get(k) != v}
    return f"{name} (fingerprint {fp.get('fingerprint')}{f', {differ}' if differ else ''})"


def check_base(meta: dict[str, str], base: Any, path: Any, *, allow_base_mismatch: bool = False) -> None:
    """Refuse an adapter saved from a different base model (see `base_fingerprint`).

    Raises:
        BaseModelMismatch: The file's fingerprint is not `base`'s and `allow_base_mismatch`
            is False.
    """
    text = meta.get(META_BASE)
    if text is None:
        logger.warning(
            "%s records no base-model fingerprint (a PEFT or older adapter); not checking that it was "
            "made for this model.",
            path,
        )
        return
    try:
        saved = json.loads(text)
    except ValueError:
        saved = None
    if not isinstance(saved, dict):
        raise AdapterFileError(f"{path}: the base-model fingerprint in its metadata is not a JSON object.")
    current = base_fingerprint(base)
    if current is None or same_base(saved, current):
        return
    message = (
        f"{path} was saved from base model {_describe_base(saved, current)}, but this model is "
        f"{_describe_base(current, saved)}. A prompt trained on one base model means nothing to another of "
        "the same width. Load it onto the model it was trained on, or pass allow_base_mismatch=True "
        "(--allow-base-mismatch) to load it anyway."
    )
    if allow_base_mismatch:
        logger.warning("%s (loading anyway: allow_base_mismatch=True)", message.split(". A prompt")[0])
        return
    raise BaseModelMismatch(message)


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in key order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Serialise to the safetensors format with a canonical header (every key sorted).

    Why not `safetensors.torch.save`: it sorts the tensor entries but writes the
    `__metadata__` map in a random order that changes from call to call (a Rust `HashMap`;
    safetensors issue #584; 0.8.0 still does), and our files carry three metadata
    entries (format, config, digest). Saving the same adapter twice would then give files
    with different bytes. This writer fixes the order of the whole header, so the same
    adapter is always the same file, byte for byte, across saves and runs (reproducible checksums).
    The output is a standard safetensors file that `safe_open` and PEFT read.
    """
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def adapter_tensors(model: SoftPromptModel, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors PEFT stores for this adapter, detached copies on the CPU."""
    out = {PROMPT_KEY: model.prompts[adapter_name].embedding.detach().to("cpu", torch.float32).clone()}
    for path, head in model.head_modules(adapter_name).items():
        for pname, value in head.state_dict().items():
            out[f"{HEAD_PREFIX}{path}.{pname}"] = value.detach().cpu().clone().contiguous()
    return out


def _file_config(model: SoftPromptModel, adapter_name: str) -> PromptTuningConfig:
    return model.peft_config[adapter_name].replace(inference_mode=True)


def save_adapter(
    model: SoftPromptModel,
    adapter_name: str,
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
    """Save one adapter into `directory` (created if needed).

    Raises:
        FileExistsError: `directory` already holds a different adapter and `overwrite` is
            False. Saving the identical adapter again is allowed.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save an adapter into {directory}: it is a file, not a folder.")
    tensors = adapter_tensors(model, adapter_name)
    config_text = _file_config(model, adapter_name).to_json_string()
    digest = tensors_digest(tensors)
    if not overwrite and _holds_other_adapter(directory, config_text, digest):
        raise FileExistsError(
            f"{directory} already holds a different adapter; pass overwrite=True to replace it, "
            "or save into another folder."
        )
    metadata = {"format": "pt", META_CONFIG: config_text, META_DIGEST: digest}
    fingerprint = base_fingerprint(model.base_model)
    if fingerprint is not None:
        metadata[META_BASE] = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))

    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / WEIGHTS_NAME, safetensors_bytes(tensors, metadata))
    atomic_write_text(directory / CONFIG_NAME, config_text)
    legacy = directory / LEGACY_WEIGHTS_NAME
    if legacy.exists():
        # A stale pickle would shadow nothing (safetensors wins) but would confuse people.
        legacy.unlink()
    return directory


def _holds_other_adapter(directory: Path, config_text: str, digest: str) -> bool:
    if not directory.is_dir():
        return False
    present = [n for n in (CONFIG_NAME, WEIGHTS_NAME, LEGACY_WEIGHTS_NAME) if (directory / n).exists()]
    if not present:
        return False
    try:
        meta = _safetensors_metadata(directory / WEIGHTS_NAME)
    except Exception:  # noqa: BLE001  (unreadable: certainly not the adapter we are about to write)
        return True
    return not (meta.get(META_DIGEST) == digest and meta.get(META_CONFIG) == config_text)


def _safetensors_metadata(path: Path) -> dict[str, str]:

    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata() or {})


# ---------------------------------------------------------------------- reading
def _read_config_text(path: Path) -> str:
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise AdapterFileError(
                f"{path} is {size} bytes; an adapter config is a few hundred. Refusing to read it."
            )
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterFileError(f"{path} is not UTF-8 text ({err}).") from None
    except OSError as err:  # a folder in its place, no permission, an I/O error
        raise AdapterFileError(f"{path} cannot be read ({err.strerror or err}).") from None


def _parse_config(text: str, source: str) -> PromptTuningConfig:
    try:
        config = PromptTuningConfig.from_json_string(text, source=source)
    except (ValueError, TypeError) as err:
        raise AdapterFileError(str(err)) from None
    # Paths in a file are informational (nothing is loaded from them when an adapter is
    # read), but one that climbs out of its folder is the mark of a crafted file.
    for name in ("base_model_name_or_path", "tokenizer_name_or_path"):
        value = getattr(config, name)
        if value and ".." in value.replace("\\", "/").split("/"):
            raise AdapterFileError(
                f"{source}: {name} {value!r} contains '..'; refusing a path that climbs out of its folder. "
                "Give the model or tokenizer as a hub id or an absolute path."
            )
    return config


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:

    if path.stat().st_size == 0:
        raise AdapterFileError(f"{path} is empty (0 bytes): the file was truncated or never written.")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (not iterable)
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
        raise AdapterFileError(
            f"{path} is not a readable safetensors file ({err}); it may be truncated or corrupted."
        ) from None
    return tensors, meta


def _load_legacy(path: Path) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (UnpicklingError for code in the pickle, others for damage)
        raise AdapterFileError(
            f"{path} could not be loaded as plain tensors ({type(err).__name__}: {str(err)[:300]}). "
            "Only weights are read from .bin files (weights_only=True); a pickle that carries code "
            "is refused."
        ) from None
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise AdapterFileError(f"{path} does not hold a dict of named tensors.")
    return data


def read_adapter(path: str | os.PathLike) -> tuple[PromptTuningConfig, dict[str, torch.Tensor]]:
    """Read and check an adapter folder; nothing is attached to any model.

    Returns:
        The config and the tensors (`prompt_embeddings` float32, head tensors by key).

    Raises:
        AdapterFileError: missing, damaged or inconsistent files, with the file named.
    """
    config, tensors, _ = _read(path)
    return config, tensors


def _read(path: str | os.PathLike) -> tuple[PromptTuningConfig, dict[str, torch.Tensor], dict[str, str]]:
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"adapter folder {folder} does not exist (or is not a folder).")
    config_path = folder / CONFIG_NAME
    weights_path = folder / WEIGHTS_NAME
    legacy_path = folder / LEGACY_WEIGHTS_NAME
    if weights_path.exists():
        tensors, meta = _load_safetensors(weights_path)
        weights_file = weights_path
    elif legacy_path.exists():
        tensors, meta, weights_file = _load_legacy(legacy_path), {}, legacy_path
    else:
        raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME} (or legacy {LEGACY_WEIGHTS_NAME}).")

    embedded = meta.get(META_CONFIG)
    if config_path.exists():
        config_text = _read_config_text(config_path)
        source = str(config_path)
        if embedded is not None and embedded.strip() != config_text.strip():
            logger.warning(
                "%s does not match the configuration stored in %s (an interrupted save?); using the "
                "latter, which was written with the weights. Save the adapter again to repair the folder.",
                config_path,
                weights_file,
            )
            config_text, source = embedded, f"{weights_file} (metadata)"
    elif embedded is not None:
        logger.warning("%s is missing; using the configuration stored in %s.", config_path, weights_file)
        config_text, source = embedded, f"{weights_file} (metadata)"
    else:
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME}.")
    config = _parse_config(config_text, source)

    if META_DIGEST in meta and tensors_digest(tensors) != meta[META_DIGEST]:
        raise AdapterFileError(
            f"{weights_file} is corrupted: its tensors do not match the checksum stored when it was saved."
        )
    _check_tensors(config, tensors, weights_file)
    tensors[PROMPT_KEY] = tensors[PROMPT_KEY].to(torch.float32)
    return config, tensors, meta


def _check_tensors(config: PromptTuningConfig, tensors: dict[str, torch.Tensor], file: Path) -> None:
    if PROMPT_KEY not in tensors:
        raise AdapterFileError(f"{file} has no tensor {PROMPT_KEY!r}; keys found: {sorted(tensors)[:10]}.")
    prompt = tensors[PROMPT_KEY]
    if not prompt.is_floating_point():
        raise AdapterFileError(
            f"{file}: {PROMPT_KEY} has dtype {prompt.dtype}; a floating-point tensor is expected."
        )
    submodules = config.num_transformer_submodules or (
        2 if prompt.dim() == 2 and prompt.shape[0] == 2 * config.num_virtual_tokens else 1
    )
    rows = config.num_virtual_tokens * submodules
    expected = (
        (rows, config.token_dim) if config.token_dim else (rows, prompt.shape[-1] if prompt.dim() else -1)
    )
    if prompt.dim() != 2 or tuple(prompt.shape) != expected:
        raise AdapterFileError(
            f"{file}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, but {CONFIG_NAME} describes "
            f"{expected} (num_virtual_tokens={config.num_virtual_tokens} x {submodules} submodules, "
            f"token_dim={config.token_dim})."
        )
    # Checked in float32, the dtype it is used in: a float64 value past float32's range would
    # become infinite, and isfinite is not implemented for every float8 dtype.
    if not torch.isfinite(prompt.to(torch.float32)).all():
        raise AdapterFileError(f"{file}: {PROMPT_KEY} contains NaN or infinite values (in float32).")
    heads = tuple(f"{HEAD_PREFIX}{m}." for m in (config.modules_to_save or []))
    extra = sorted(k for k in tensors if k != PROMPT_KEY and not k.startswith(heads))
    if extra:
        raise AdapterFileError(
            f"{file} holds unexpected tensors {extra[:5]}; only {PROMPT_KEY!r} and the heads named in "
            f"modules_to_save ({config.modules_to_save}) belong in a prompt-tuning adapter."
        )
    for key, value in tensors.items():
        if (
            key != PROMPT_KEY
            and value.is_floating_point()
            and not torch.isfinite(value.to(torch.float32)).all()
        ):
            raise AdapterFileError(f"{file}: {key} contains NaN or infinite values.")


def fit_to_model(
    config: PromptTuningConfig, tensors: dict[str, torch.Tensor], base: Any, path: Any
) -> PromptTuningConfig:
    """Check that the adapter was made for a model of this hidden size; return its config
    with `modules_to_save` cut to heads this model has.

    PEFT writes every head name it might have trained ("classifier", "score") whether the
    model has it or not, and matches them by name; a name this model lacks is dropped.
    """

    hidden = hidden_size(base)
    prompt = tensors[PROMPT_KEY]
    if prompt.shape[1] != hidden:
        raise AdapterFileError(
            f"{Path(path) / WEIGHTS_NAME}: {PROMPT_KEY} has shape {tuple(prompt.shape)}, but this model "
            f"({type(base).__name__}, hidden size {hidden}) needs ({prompt.shape[0]}, {hidden}). "
            "The adapter was trained on a different model."
        )
    if config.modules_to_save:
        config = config.replace(modules_to_save=[m for m in config.modules_to_save if find_module(base, m)])
    return config


def match_head_tensors(
    base: Any, config: PromptTuningConfig, tensors: dict[str, torch.Tensor], path: Any
) -> dict[str, tuple[str, str]]:
    """Map each head tensor key to (head path, parameter name), checking every shape.

    Raises before anything is attached, so a bad file leaves the model untouched.
    """

    plan: dict[str, tuple[str, str]] = {}
    heads = config.modules_to_save or []
    for key, value in tensors.items():
        if key == PROMPT_KEY:
            continue
        rest = key[len(HEAD_PREFIX) :]
        owner = next((h for h in heads if rest.startswith(h + ".")), None)
        found = find_module(base, owner) if owner else None
        if found is None:
            raise AdapterFileError(f"{path}: tensor {key} belongs to no head of this model ({heads}).")
        module = found[2].original if isinstance(found[2], HeadSwitch) else found[2]
        pname = rest[len(owner) + 1 :]
        state = module.state_dict()
        if pname not in state:
            raise AdapterFileError(f"{path}: {key} names {pname!r}, which head {owner!r} does not have.")
        if tuple(state[pname].shape) != tuple(value.shape):
            raise AdapterFileError(
                f"{path}: {key} has shape {tuple(value.shape)}, this model's {owner}.{pname} has "
                f"{tuple(state[pname].shape)} (a different number of labels?)."
            )
        plan[key] = (owner, pname)
    missing = [h for h in heads if not any(o == h for o, _ in plan.values())]
    if missing:
        logger.warning(
            "%s: no saved weights for head(s) %s; they keep the base model's values.", path, missing
        )
    return plan


def apply_head_tensors(
    model: SoftPromptModel,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    plan: dict[str, tuple[str, str]],
) -> None:
    """Copy checked head weights (see `match_head_tensors`) into the adapter's head copies."""
    heads = model.head_modules(adapter_name)
    with torch.no_grad():
        for key, (owner, pname) in plan.items():
            target = heads[owner].state_dict(keep_vars=True)[pname]
            target.copy_(tensors[key].to(target.dtype))


@dataclass
class LoadPlan:
    """A checked adapter folder, ready to attach: nothing has touched the model yet.

    Attributes:
        config: The file's config, `modules_to_save` cut to heads the model has.
        prompt: `prompt_embeddings`, float32 `(num_virtual_tokens * submodules, hidden)`.
        tensors: Every tensor of the file, by key.
        heads: Head tensor key -> (head path, parameter name), see `match_head_tensors`.
    """

    config: PromptTuningConfig
    prompt: torch.Tensor
    tensors: dict[str, torch.Tensor]
    heads: dict[str, tuple[str, str]]

    def apply_heads(self, model: SoftPromptModel, adapter_name: str) -> None:
        """Copy the head weights into the heads of the adapter once it has been created."""
        apply_head_tensors(model, adapter_name, self.tensors, self.heads)


def plan_load(
    path: str | os.PathLike,
    base: Any,
    resolve: Callable[[PromptTuningConfig], PromptTuningConfig] | None = None,
    *,
    allow_base_mismatch: bool = False,
) -> LoadPlan:
    """Read an adapter folder and check it against `base` before anything is attached.

    Args:
        path: The adapter folder.
        base: The transformers model it will be attached to.
        resolve: How the wrapping model completes the config (its default heads), so head
            tensors are matched against the heads it will create; None matches them against
            the file's own `modules_to_save`.
        allow_base_mismatch: Load an adapter saved from a different base model (of the
            same width) instead of raising `BaseModelMismatch`.
    """
    config, tensors, meta = _read(path)
    config = fit_to_model(config, tensors, base, path)
    check_base(meta, base, path, allow_base_mismatch=allow_base_mismatch)
    heads_config = resolve(config) if resolve is not None else config
    plan = match_head_tensors(base, heads_config, tensors, path)
    return LoadPlan(config, tensors[PROMPT_KEY], tensors, plan)


def load_adapter(
    model: SoftPromptModel,
    path: str | os.PathLike,
    adapter_name: str,
    *,
    trainable: bool = False,
    allow_base_mismatch: bool = False,
) -> None:
    """Read an adapter folder and attach it to `model` under `adapter_name` (all or nothing).

    Raises:
        BaseModelMismatch: The adapter was saved from a different base model (see
            `base_fingerprint`) and `allow_base_mismatch` is False.
    """
    if adapter_name in model.prompts:
        raise ValueError(f"an adapter named {adapter_name!r} is already loaded; pick another name.")
    plan = plan_load(path, model.base_model, model.resolve_config, allow_base_mismatch=allow_base_mismatch)
    model.add_adapter(adapter_name, plan.config, trainable=trainable, init=plan.prompt)
    plan.apply_heads(model, adapter_name)


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Config and tensor shapes of an adapter folder, for humans (no model needed)."""
    config, tensors = read_adapter(path)
    return {
        "config": config.to_dict(),
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "bytes": sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file()),
    }


def load_weights_into(model: SoftPromptModel, adapter_name: str, path: str | os.PathLike) -> None:
    """Overwrite an existing adapter's prompt (and heads) with the weights saved in `path`.

    Used to resume training and to go back to the best checkpoint; shapes must match.
    """
    _, tensors = read_adapter(path)
    prompt = model.prompts[adapter_name].embedding
    if tuple(prompt.shape) != tuple(tensors[PROMPT_KEY].shape):
        raise AdapterFileError(
            f"{path}: {PROMPT_KEY} has shape {tuple(tensors[PROMPT_KEY].shape)}, adapter "
            f"{adapter_name!r} has {tuple(prompt.shape)}."
        )
    plan = match_head_tensors(model.base_model, model.peft_config[adapter_name], tensors, path)
    with torch.no_grad():
        prompt.copy_(tensors[PROMPT_KEY])
    apply_head_tensors(model, adapter_name, tensors, plan)
