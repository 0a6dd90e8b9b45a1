"""One prompt per seed, then the ensemble of their best prompts (`softprompt train --seeds
0,1,2`): each seed is an ordinary run in `OUTPUT/seed-<k>/`, and `OUTPUT/results.json` holds
the ensemble's scores next to each member's (`softprompt.scoring.ensemble`)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from softprompt import devices
from softprompt._io import atomic_write_text
from softprompt.base_models import load_model
from softprompt.core.model import SoftPromptModel
from softprompt.data import BUILTIN
from softprompt.scoring.ensemble import score_ensemble
from softprompt.settings import TrainConfig, TrainingError
from softprompt.training.runs import build_objective, load_data
from softprompt.training.trainer import TrainResult, train


@dataclass
class SeedsResult:
    """What `train_seeds` did.

    Attributes:
        output_dir: The parent folder; each seed's run is in `output_dir/seed-<k>/`.
        runs: Each seed's `TrainResult`, by folder name.
        results: What `output_dir/results.json` holds.
    """

    output_dir: Path
    runs: dict[str, TrainResult] = field(default_factory=dict)
    results: dict[str, Any] = field(default_factory=dict)


def train_seeds(
    config: TrainConfig,
    seeds: Sequence[int],
    callback: Callable[[str, dict[str, Any]], None] | None = None,
    *,
    batch_size: int = 64,
) -> SeedsResult:
    """Train one prompt per seed, then score the ensemble of their best prompts.

    Each seed `k` is `train(config with seed=k, output_dir=<output_dir>/seed-<k>)`,
    so resume and overwrite work per seed as for one run (`config.resume`, `config.overwrite`).
    The ensemble of the seeds' `best/` prompts is then scored in one batched pass on the test
    split (or on the dev split when it is the same for every seed: a built-in set, `dev_data`),
    and `<output_dir>/results.json` gets the ensemble's metrics next to each member's, their
    mean and the best member.

    Args:
        config: The recipe; its `seed` is replaced by each of `seeds`.
        seeds: Distinct integer seeds.
        callback: As for `train` (also told "phase" for each seed and the ensemble).
        batch_size: Inputs per batched pass when scoring the ensemble.

    Raises:
        TrainingError: As `train` (per seed), or `output_dir` holds a single run.
    """
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise TrainingError(f"seeds must be distinct integers, at least one; got {seeds}.")
    if devices.launched():
        raise TrainingError(
            "train --seeds runs in one process; start it without torchrun / accelerate launch "
            "(or train each seed under them with train --seed K --output DIR/seed-K)."
        )
    out = Path(config.output_dir)
    if (out / "run_config.json").exists():
        raise TrainingError(
            f"{out} holds a single training run; --seeds writes one run per seed into {out}/seed-<k>/ "
            "and the ensemble's results next to them: choose another --output folder."
        )
    notify = callback or (lambda event, info: None)
    result = SeedsResult(out)
    for number, seed in enumerate(seeds, 1):
        name = f"seed-{seed}"
        notify("phase", {"message": f"seed {seed} ({number}/{len(seeds)}): training into {out / name}"})
        seed_config = dataclasses.replace(config, seed=seed, output_dir=str(out / name))
        result.runs[name] = train(seed_config, callback)
    result.results = _score_seeds(config, out, seeds, result.runs, notify, batch_size)
    atomic_write_text(out / "results.json", json.dumps(result.results, indent=2) + "\n")
    return result


def _score_seeds(
    config: TrainConfig,
    out: Path,
    seeds: list[int],
    runs: dict[str, TrainResult],
    notify: Callable[[str, dict[str, Any]], None],
    batch_size: int,
) -> dict[str, Any]:
    names = list(runs)
    results: dict[str, Any] = {"seeds": seeds, "runs": {name: str(out / name) for name in names}}
    first = runs[names[0]].metrics
    if "zero_shot" in first:
        results["zero_shot"] = first["zero_shot"]
    spec = load_data(config, seeds[0])
    # A training file without dev_data holds out a different 10% per seed: no common dev split.
    common_dev = (
        config.dev_data is not None or not isinstance(config.data, (str, Path)) or config.data in BUILTIN
    )
    split, examples = ("test", spec.test) if spec.test else ("dev", spec.dev if common_dev else None)
    skipped = None
    if spec.task != "classification":
        skipped = "ensembles average label log-probabilities: classification only"
    elif not examples:
        skipped = "no test split (nor a dev split shared by every seed: give --test-data or --dev-data)"
    if skipped is not None:
        results.update(
            {
                "final_split": first.get("final_split"),
                "members": {name: runs[name].metrics.get("tuned") for name in names},
                "ensemble": None,
                "ensemble_skipped": skipped,
            }
        )
        return results
    notify(
        "phase",
        {"message": f"scoring the ensemble of {len(names)} prompts on {split} ({len(examples)} examples)"},
    )
    device = devices.resolve_device(config.device)
    dtype = devices.resolve_dtype(config.dtype, device)
    base, tokenizer = load_model(config.model, dtype=dtype, device=device)
    model = SoftPromptModel.from_pretrained(base, out / names[0] / "best", adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(out / name / "best", name)
    model.eval()
    objective = build_objective(spec, examples, tokenizer, config)
    info = json.loads((out / names[0] / "run_config.json").read_text(encoding="utf-8"))
    bf16 = bool(info.get("resolved", {}).get("bf16"))  # as each run scored its own prompt
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        scored = score_ensemble(objective, model, names, batch_size=batch_size)
    results.update({"final_split": split, **scored.to_dict()})
    return results


__all__ = ["SeedsResult", "train_seeds"]
