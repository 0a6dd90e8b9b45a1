"""Training checkpoints: everything needed to resume a run exactly, written atomically.

A checkpoint is a folder `checkpoints/step-<N>/` holding the adapter files (PEFT format)
and `trainer_state.pt` (optimizer, scheduler, RNG states, data position, step, early
stopping state; read back with `torch.load(weights_only=True)`). It is assembled in a
hidden temporary folder and renamed into place, so a checkpoint either exists whole or
not at all; only the newest `keep` are kept. A run killed at any moment, even during a
write, resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt._io import fsync_dir, fsync_files
from softprompt.core.adapter_files import AdapterFileError, read_adapter, save_adapter

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next batch of the data order."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(root: Path, model: Any, adapter: str, state: dict[str, Any], keep: int) -> Path:
    """Write `root/step-<N>` atomically, then prune to the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    step = int(state["position"]["step"])
    final = root / f"step-{step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        save_adapter(model, adapter, tmp, overwrite=True)
        torch.save(state, tmp / STATE_NAME)
        fsync_files(tmp)
        if final.exists():  # the same step saved again (e.g. after an interrupt): replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders are never listed)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def clean_temporary(root: Path) -> None:
    """Remove half-written checkpoint folders left by a killed run."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".tmp-step-"):
                shutil.rmtree(p, ignore_errors=True)


def load_latest(root: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads, with its trainer state.

    A damaged checkpoint (state file missing, truncated or unreadable; adapter files missing
    or damaged) is reported with a warning naming it, the reason and the checkpoint used
    instead. Any other error (a bug, not a damaged file) propagates.
    """

    clean_temporary(root)
    # What torch.load raises on a missing / empty / truncated / garbled file: OSError, EOFError,
    # RuntimeError ("PytorchStreamReader failed reading zip archive"), UnpicklingError, BadZipFile.
    state_errors = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile)
    damaged: list[tuple[Path, str]] = []
    for folder in reversed(list_checkpoints(root)):
        reason = None
        try:
            state = torch.load(folder / STATE_NAME, map_location="cpu", weights_only=True)
        except state_errors as err:
            reason = f"{STATE_NAME} cannot be read ({type(err).__name__}: {err})"
        else:
            if not isinstance(state, dict) or "position" not in state:
                reason = f"{STATE_NAME} holds no trainer state"
        if reason is None:
            try:
                read_adapter(folder)  # wraps safetensors' and JSON errors in AdapterFileError
            except (AdapterFileError, OSError) as err:
                reason = f"the adapter files are damaged ({type(err).__name__}: {err})"
        if reason is None:
            for bad, why in damaged:
                logger.warning(
                    "checkpoint %s is damaged: %s; resuming from the older checkpoint %s instead",
                    bad,
                    why,
                    folder,
                )
            return folder, state
        damaged.append((folder, reason))
    for bad, why in damaged:
        logger.warning("checkpoint %s is damaged: %s; no older checkpoint loads", bad, why)
    return None
