"""The bare model's test scores, kept between runs.

A training run also scores the bare model on the test set, for comparison: a full pass
over the test examples that gives the same numbers every time the model, the examples and
the way they are computed are the same (on a 2-core AVX2 CPU in float32, 72 of the
short recipe's 480 seconds). So the scores are kept in the cache folder
(`softprompt.paths.cache_dir("scores")`), one small JSON file per key, and a later run
whose key matches reads them instead of scoring again.

The key is a SHA-256 over everything the numbers depend on:

- the weights: every parameter and buffer of the base model by name, shape and dtype,
  with up to 4,096 values sampled at fixed strides from each (a different checkpoint of
  the same architecture differs in nearly every tensor; `weights_sample` below);
- the examples as scored: token ids, gold labels, label-word token ids, padding id and
  prompt positions (so the data, the template, the label words and `max_length`);
- how they are computed: device type, the weights' dtype, bfloat16 autocast or not, the
  CPU kernels torch dispatches to (`torch.backends.cpu.get_cpu_capability`), the torch,
  transformers and softprompt versions and softprompt's source files (`source_digest`), the
  scoring batch size.

Only single-process runs of classification objectives use it (a distributed or sharded
run, or a generation objective, scores as before). `--no-reuse-zero-shot` scores again;
deleting the folder forgets everything. A file that cannot be read is ignored and
rewritten. What a run reused is written in its results (`"reused": the cache file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
import transformers

from softprompt import __version__
from softprompt._io import atomic_write_text
from softprompt.paths import cache_dir
from softprompt.scoring.objectives import ClassificationObjective
from softprompt.sharding import distributed

logger = logging.getLogger(__name__)

VERSION = 1
SAMPLE_VALUES = 4096


def weights_sample(module: torch.nn.Module) -> str:
    """A SHA-256 over every parameter and buffer: name, shape, dtype and up to
    `SAMPLE_VALUES` values taken at a fixed stride through the flattened tensor."""
    digest = hashlib.sha256()
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers())
    with torch.no_grad():
        for name, tensor in sorted(named, key=lambda item: item[0]):
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
            if tensor.device.type == "meta" or tensor.numel() == 0:
                continue
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // SAMPLE_VALUES)
            sample = flat[::step][:SAMPLE_VALUES].to("cpu")
            if sample.dtype == torch.bfloat16:
                sample = sample.view(torch.int16)
            digest.update(sample.contiguous().numpy().tobytes())
    return digest.hexdigest()


def source_digest() -> str:
    """A SHA-256 over softprompt's own source files: a release or an edit that may change how
    scores are computed gives another key."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"|" + path.read_bytes())
    return digest.hexdigest()


def scores_key(model: Any, objective: Any, *, bf16: bool, batch_size: int) -> str | None:
    """The cache key of the bare model's scores on `objective`, or None where the scores are
    not kept (not a classification objective; a distributed run)."""

    if not isinstance(objective, ClassificationObjective) or distributed.world_size() > 1:
        return None

    base = model.base_model
    weight = base.get_input_embeddings().weight
    examples = {
        "rows": objective.rows,
        "gold": objective.gold,
        "label_token_ids": objective.verbalizer.token_ids,
        "pad_id": objective.pad_id,
        "prompt_positions": objective.prompt_positions,
    }
    fields = {
        "version": VERSION,
        "weights": weights_sample(base),
        "examples": hashlib.sha256(json.dumps(examples, sort_keys=True).encode()).hexdigest(),
        "device": weight.device.type,
        "dtype": str(weight.dtype),
        "bf16_autocast": bool(bf16),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "softprompt": __version__,
        "code": source_digest(),
        "batch_size": batch_size,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _file(key: str) -> Path:
    return cache_dir("scores") / f"{key[:32]}.json"


def lookup(key: str) -> tuple[dict[str, Any], Path] | None:
    """The scores kept under `key` and their file, or None (none kept, or unreadable)."""
    path = _file(key)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        logger.warning("ignoring the unreadable score cache file %s: %s", path, err)
        return None
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("scores"), dict):
        return None
    return record["scores"], path


def store(key: str, scores: dict[str, Any], about: dict[str, Any]) -> Path | None:
    """Keep `scores` under `key`; a cache folder that cannot be written is reported, not fatal."""
    path = _file(key)
    record = {"key": key, "scores": scores, "saved": time.strftime("%Y-%m-%d %H:%M:%S"), **about}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(record, indent=2, default=_plain) + "\n")
    except OSError as err:
        logger.warning("could not keep the bare model's scores in %s: %s", path, err)
        return None
    return path


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)
