"""Train a soft prompt: the loop behind `softprompt train`, usable from Python.

>>> from softprompt.training.trainer import TrainConfig, train
>>> result = train(TrainConfig(output_dir="runs/sst", data="movie-reviews"))

The output folder receives `best/` and `last/` adapters (PEFT format), `metrics.jsonl`,
`plot.png`, `run_config.json` (the exact configuration, versions and data sizes) and
`checkpoints/` for `resume=True`. Defaults are the recipe measured on the built-in
movie-reviews data with SmolLM2-135M-Instruct (see README, "The default recipe, and how
it was found").

The loop is a `Trainer` in parts a reader can find and a distributed run can hook into:
`setup` (data, model, optimizer, resume), `step` (one optimizer step), `evaluate` (dev
score, `best/`), `save` (a resumable checkpoint) and `finish` (final scores, plot), with
the run's mutable state in one `TrainState`.

Started by `torchrun --nproc_per_node N -m softprompt train ...` (or `accelerate launch`),
each optimizer step takes `grad_accum x N` consecutive micro-batches of the data order and
process r computes micro-batches r, r+N, ...; every loss is divided by the step's number of
micro-batches and the prompt's gradients are summed over the processes, so N processes with
`grad_accum=G` compute exactly the step of one process with `grad_accum=G x N` (the same
data, order and update; float sums in another order: allclose, not bit-identical). Dev and
test examples are shared out and their predictions gathered: the metrics are the
1-process numbers. Only rank 0 writes files and reports progress. See `distributed`.

With `fsdp=True` the frozen model is sharded over the processes (`distributed.shard_model`),
with `zero3=True` (or under `accelerate launch --use_deepspeed --zero_stage 3`) by DeepSpeed
ZeRO-3 (`softprompt.sharding.zero3`); either way every forward pass then gathers weights, so every rank
makes the same passes (a stand-in pass at the end of an epoch, evaluation not shared out) and
training passes take the uncached prompt path (see `Trainer._prompt_cache`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from softprompt import sharding
from softprompt._io import atomic_write_text
from softprompt.core.adapter_files import load_weights_into
from softprompt.core.attention import attention_implementation, training_attention
from softprompt.core.bf16 import bf16_weight_copies
from softprompt.scoring.objectives import Objective, evaluate, length_grouped_batches
from softprompt.settings import TrainConfig, TrainingDiverged, TrainingError, TrainingInterrupted
from softprompt.sharding import distributed
from softprompt.training import score_cache
from softprompt.training.checkpoints import (
    Position,
    list_checkpoints,
    load_latest,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from softprompt.training.plot import plot_metrics
from softprompt.training.runs import Run, prepare_run, resolve_recipe
from softprompt.training.tracking import Reporters

if TYPE_CHECKING:
    from typing_extensions import Self

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` returns: where the run is, how far it went, its final scores."""

    output_dir: Path
    steps: int
    metrics: dict[str, Any]
    best_step: int | None
    seconds: float


Callback = Callable[[str, dict[str, Any]], None]


# ---------------------------------------------------------------------- optimisation
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
    """AdamW or Adafactor over `params`, as the config says."""
    if config.optimizer == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise TrainingError("optimizer 'adafactor' needs torch >= 2.5; upgrade torch or use adamw.")
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


@dataclass
class TrainState:
    """Everything about a run that changes as it trains, and what a checkpoint keeps of it.

    Attributes:
        optimizer: The prompt's optimizer.
        scheduler: Its learning-rate schedule.
        position: Optimizer steps done and the next batch of the data order.
        best_metric: The best dev score so far (None: no evaluation yet).
        best_step: The step that scored it.
        patience: Evaluations since the last improvement.
    """

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    position: Position = field(default_factory=Position)
    best_metric: float | None = None
    best_step: int | None = None
    patience: int = 0

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint payload (`trainer_state.pt`), RNG states included."""
        return {
            "position": dataclasses.asdict(self.position),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "best": {"metric": self.best_metric, "step": self.best_step},
            "patience": self.patience,
        }

    def load_state_dict(self, state: dict[str, Any], lr: float) -> None:
        """Continue from a checkpoint payload; `lr` may differ from the run that wrote it."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        scheduler = self.scheduler
        if scheduler.base_lrs != [lr] * len(scheduler.base_lrs):  # resumed with a new --lr
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
            for group, base in zip(self.optimizer.param_groups, scheduler.base_lrs):
                group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)
        set_rng_state(state["rng"])
        self.position = Position(**state["position"])
        self.best_metric, self.best_step = state["best"]["metric"], state["best"]["step"]
        self.patience = int(state["patience"])

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class _Metrics:
    """metrics.jsonl, appended line by line; on resume cut back to the checkpoint's step."""

    def __init__(
        self,
        path: Path,
        resume_step: int | None,
        enabled: bool = True,
        report_to: str = "none",
        params: dict[str, Any] | None = None,
    ) -> None:
        self.path, self.enabled = path, enabled
        self.records: list[dict[str, Any]] = []
        # --report-to: the trackers (rank 0 only), fed the same records
        self.reporters = Reporters(report_to if enabled else "none", path.parent, params)
        if not enabled:  # not rank 0: nothing is written
            return
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
        if not self.enabled:
            return
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        self.reporters.log(record)

    def close(self, status: str = "finished") -> None:
        """Close the trackers (once): "finished", "failed" or "killed"."""
        self.reporters.close(status)


class _Window:
    """Training loss and throughput since the last metrics line."""

    def __init__(self) -> None:
        self.loss, self.steps, self.examples, self.start = 0.0, 0, 0, time.time()

    def add(self, loss: float, examples: int) -> None:
        self.loss += loss
        self.steps += 1
        self.examples += examples

    def record(self) -> tuple[float, float]:
        """The mean loss and examples/s of the window; starts a new window."""
        elapsed = time.time() - self.start
        out = self.loss / self.steps, self.examples / max(elapsed, 1e-9)
        self.__init__()
        return out


# ---------------------------------------------------------------------- the loop
class Trainer:
    """One training run, in parts: `setup`, `step`, `evaluate`, `save`, `finish`; `fit` runs them.

    Args:
        config: The run's settings.
        callback: Called as `callback(event, info)` for "start", "step", "eval", "phase",
            "progress" and "end"; the CLI's progress bar is one.
    """

    adapter = "default"

    def __init__(self, config: TrainConfig, callback: Callback | None = None) -> None:
        self.config = config
        self.notify: Callback = callback or (lambda event, info: None)
        self.out = Path(config.output_dir)
        self.started = time.time()
        self.stop_reason = "max_steps"
        self.stop_agreed = False  # a distributed run: some rank got Ctrl-C (agreed at each step)
        self._stop: _StopOnSignal | None = None
        self._owns_group = False

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Prepare the run (folder, data, model, prompt), the optimizer, and resume if asked."""
        config, out = self.config, self.out
        self._owns_group = sharding.join_process_group(config.device)  # under torchrun / accelerate
        self.main, self.world = distributed.is_main(), distributed.world_size()
        self.notify = distributed.on_main(self.notify)  # progress shows on rank 0 only
        self.config, recipe = resolve_recipe(config)
        config = self.config
        self.notify("phase", {"message": recipe})
        self.run: Run = prepare_run(config, self.notify)
        self.model, self.objective, self.dev = self.run.model, self.run.train, self.run.dev
        #: how the run spreads over processes (chosen once by `prepare_run`); the loop calls it
        self.strategy = strategy = self.run.strategy
        self.params = self.model.trainable_parameters()
        strategy.broadcast(self.params)  # every rank starts from rank 0's prompt
        per_step = config.batch_size * config.grad_accum * self.world
        self.total_steps = config.max_steps or max(
            1, math.ceil(config.epochs * len(self.objective) / per_step)
        )
        optimizer = make_optimizer(config, self.model.trainable_parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(config, self.total_steps))
        self.state = TrainState(optimizer, scheduler)
        # float16 weights: the loss is scaled so small gradients survive the backward pass
        fp16 = self.run.info["resolved"].get("dtype") == "float16"
        self.scaler = torch.amp.GradScaler(self.model.device.type) if fp16 else None
        # rank 0 reads the checkpoint; the others get it from there
        latest = load_latest(out / "checkpoints") if config.resume and self.main else None
        resumed = strategy.broadcast_object(latest)
        # (a sharded table is gathered on every rank: the adapter's base-model check reads it)
        with strategy.full_embeddings(self.model.base_model):
            if resumed is not None and self.main:
                load_weights_into(self.model, self.adapter, resumed[0])
        if resumed is not None:
            strategy.broadcast(self.params)
            folder, payload = resumed
            self.state.load_state_dict(payload, config.lr)
            if self.scaler is not None and "scaler" in payload:
                self.scaler.load_state_dict(payload["scaler"])
            step = self.state.position.step
            if self.main:
                logger.info("resuming from %s (step %d)", folder, step)
            self.notify("phase", {"message": f"resuming from {folder.name} (step {step})"})
        elif config.resume:
            self.notify("phase", {"message": "no checkpoint found: starting from the beginning"})
        self.metrics = _Metrics(out / "metrics.jsonl", self.state.position.step if resumed else None,
                                self.main, config.report_to, config.to_dict())  # fmt: skip
        if resumed is None:
            self.metrics.write(
                {
                    "step": 0,
                    "event": "start",
                    "train_examples": len(self.objective),
                    "dev_examples": len(self.dev) if self.dev else 0,
                    "total_steps": self.total_steps,
                }
            )
        self.dev_indices = _dev_subset(self.dev, config)
        self.device = self.model.device
        self.bf16 = self.run.info["resolved"]["bf16"]

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast for the frozen model where the run uses it (else a no-op)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    # ------------------------------------------------------------------ one step
    def step(self, group: list[list[int]]) -> float:
        """One optimizer step over `group` (grad_accum micro-batches of example indices).

        Returns:
            The step's loss (the mean over its micro-batches).

        Raises:
            TrainingDiverged: A loss is NaN or infinite (its checkpoint is dropped first).
        """
        lengths, state, strategy = self.objective.lengths, self.state, self.strategy
        step_loss, bad = 0.0, None
        # this rank's micro-batches (all of them in one process), with any stand-in passes
        for indices, real in strategy.passes(group):
            positions = max(lengths[i] for i in indices) + self.config.num_virtual_tokens
            attention = training_attention(self.model.base_model, self.bf16, self.device, positions)
            with (
                attention_implementation(self.model.base_model, attention),
                strategy.training_pass(self.model),
            ):
                with self.autocast():
                    loss = self.objective.loss(self.model, indices) / len(group)
                if not real:
                    loss = loss * 0.0
                elif not torch.isfinite(loss):
                    bad = loss.detach()  # every rank learns of it in the reduction below
                    if strategy.stops_at_a_bad_loss:
                        break
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            if real:
                step_loss += float(loss.detach())
        # one collective (none in one process): the prompt's gradient, the loss, Ctrl-C, divergence
        stop = bool(self._stop is not None and self._stop.requested)
        flags = strategy.reduce(self.params, [step_loss, float(stop), float(bad is not None)])
        step_loss, self.stop_agreed = flags[0], self.stop_agreed or flags[1] > 0
        if flags[2] > 0:
            value = bad if bad is not None else torch.tensor(float("nan"))
            message = _diverged(value, state.position, state.scheduler, self.out, remove=self.main)
            raise TrainingDiverged(message)
        if self.scaler is not None:
            self.scaler.step(state.optimizer)
            self.scaler.update()
        else:
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.scheduler.step()
        state.position.batch += len(group)
        state.position.step += 1
        return step_loss

    # ------------------------------------------------------------------ evaluate / save
    def evaluate(self) -> bool:
        """Score the prompt on dev; a new best is saved to `best/`. Returns whether it improved."""
        state, dev = self.state, self.dev
        with self.autocast(), self.strategy.evaluation():
            scores = evaluate(dev, self.model, self.dev_indices, adapter=self.adapter)
        value = scores[dev.primary_metric]
        improved = state.best_metric is None or value > state.best_metric
        if improved:  # the same on every rank: the scores are
            state.best_metric, state.best_step = value, state.position.step
            with self.strategy.full_embeddings(self.model.base_model):
                if self.main:
                    self.model.save_pretrained(self.out / "best", overwrite=True)
            state.patience = 0
        else:
            state.patience += 1
        record = {"step": state.position.step, "event": "eval", **{f"dev_{k}": v for k, v in scores.items()}}
        self.metrics.write(record)
        self.notify("eval", {**record, "improved": improved})
        return improved

    def save(self) -> Path:
        """Write a resumable checkpoint of the current state (rank 0); returns its folder.
        Every rank calls it (under FSDP the adapter's base-model fingerprint gathers rows)."""
        with self.strategy.full_embeddings(self.model.base_model):
            if not self.main:
                return self.out / "checkpoints" / f"step-{self.state.position.step:08d}"
            return save_checkpoint(
                self.out / "checkpoints",
                self.model,
                self.adapter,
                {**self.state.state_dict(), **({"scaler": self.scaler.state_dict()} if self.scaler else {})},
                self.config.keep_checkpoints,
            )

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        """Set up, train to the end (or early stop), save and score; see `train`."""
        self.setup()
        try:
            return self._train()
        except BaseException as err:  # the trackers learn how the run ended
            killed = isinstance(err, (TrainingInterrupted, KeyboardInterrupt))
            self.metrics.close("killed" if killed else "failed")
            raise

    def _train(self) -> TrainResult:
        config, state = self.config, self.state
        position = state.position
        self.notify("start", {"total_steps": self.total_steps, "step": position.step,
                              "train_examples": len(self.objective)})  # fmt: skip
        self.model.train()
        window = _Window()
        # (FSDP and ZeRO-3 manage the sharded weights themselves: autocast casts them per call, the
        # same rounding)
        copies = self.bf16 and not self.strategy.sharded
        with _StopOnSignal() as stop, bf16_weight_copies(self.model.base_model, copies):
            self._stop = stop
            while position.step < self.total_steps:
                batches = length_grouped_batches(self.objective.lengths, config.batch_size, config.seed,
                                                 position.epoch)  # fmt: skip
                while position.batch < len(batches) and position.step < self.total_steps:
                    if self.strategy.stop(stop.requested, self.stop_agreed):  # Ctrl-C: between steps
                        folder = self.save()
                        self.strategy.barrier()  # the others wait for rank 0's checkpoint
                        raise TrainingInterrupted(
                            f"interrupted at step {position.step}; checkpoint saved to {folder}. "
                            "Run the same command with --resume to continue."
                        )
                    group = batches[position.batch : position.batch + config.grad_accum * self.world]
                    loss = self.step(group)
                    examples = sum(len(g) for g in group)
                    window.add(loss, examples)
                    self.notify("step", {"step": position.step, "total_steps": self.total_steps, "loss": loss,
                                         "lr": state.lr, "examples": examples})  # fmt: skip
                    if position.step % config.log_every == 0 or position.step == self.total_steps:
                        loss, speed = window.record()
                        self.metrics.write({"step": position.step, "epoch": position.epoch, "loss": loss,
                                            "lr": state.lr, "examples_per_s": speed})  # fmt: skip
                    if self._due(config.eval_every) and self.dev is not None:
                        self.evaluate()
                        patience = config.early_stopping_patience
                        if patience is not None and state.patience >= patience:
                            self.stop_reason = (
                                f"early stopping: no dev improvement in {state.patience} evaluations"
                            )
                            self.total_steps = position.step
                            break
                    if self._due(config.checkpoint_every):
                        self.save()
                if position.batch >= len(batches):
                    position.epoch += 1
                    position.batch = 0
        return self.finish()

    def _due(self, every: int) -> bool:
        return bool(every) and self.state.position.step % every == 0

    def finish(self) -> TrainResult:
        """Last dev evaluation, checkpoint and adapters; test scores, metrics and plot."""
        config, state, out = self.config, self.state, self.out
        if self.dev is not None and not self._due(config.eval_every):
            self.evaluate()
        self.save()
        with self.strategy.full_embeddings(self.model.base_model):
            if self.main:
                self.model.save_pretrained(out / "last", overwrite=True)
                if state.best_step is None:  # no dev set: the last prompt is the best we know
                    self.model.save_pretrained(out / "best", overwrite=True)
        final = self.final_scores()
        final.update(
            {
                "stop_reason": self.stop_reason,
                "steps": state.position.step,
                "best_step": state.best_step,
                "best_dev": state.best_metric,
                "seconds": round(time.time() - self.started, 1),
            }
        )
        self.metrics.write({"step": state.position.step, "event": "end", **final})
        self.metrics.close()
        if self.main:
            plot_metrics(self.metrics.records, out / "plot.png", self.objective.primary_metric)
        self.notify("end", final)
        self.strategy.barrier()  # no rank leaves before rank 0 has written everything
        sharding.close_process_group(self._owns_group)
        return TrainResult(out, state.position.step, final, state.best_step, time.time() - self.started)

    def final_scores(self) -> dict[str, Any]:
        """Score the best adapter (and the bare model) on the test set, or dev if there is none."""
        run = self.run
        split, data = ("test", run.test) if run.test is not None else ("dev", run.dev)
        if data is None:
            return {}
        best = self.out / "best"
        with self.strategy.full_embeddings(self.model.base_model):  # see `setup`
            if self.main and (best / "adapter_config.json").exists():
                load_weights_into(self.model, self.adapter, best)
        self.strategy.broadcast(self.params)  # rank 0 read best/: no shared disk needed
        results: dict[str, Any] = {"final_split": split}
        names = [("tuned", self.adapter)] + ([("zero_shot", None)] if self.config.zero_shot else [])
        for label, name in names:
            if name is None:
                results[label], reused = self._bare_scores(split, data)
                if reused is not None:
                    results["zero_shot_reused_from"] = str(reused)
                continue
            self.notify(
                "phase",
                {"message": f"scoring the best prompt on {split} ({len(data)} examples)", "total": len(data)},
            )
            with self.autocast(), self.strategy.evaluation():
                scores = evaluate(
                    data, self.model, None, adapter=name, progress=lambda n: self.notify("progress", {"n": n})
                )
            results[label] = scores
        if self.main:
            atomic_write_text(self.out / "results.json", json.dumps(results, indent=2) + "\n")
        return results

    def _bare_scores(self, split: str, data: Objective) -> tuple[dict[str, Any], Path | None]:
        """The bare model's scores on `data` and the file they came from: those an earlier run
        kept under the same key (see `softprompt.training.score_cache`), else scored now (and kept)."""

        key = None
        if self.config.reuse_zero_shot and self.strategy.reuses_kept_scores:
            key = score_cache.scores_key(self.model, data, bf16=self.bf16, batch_size=64)
        kept = score_cache.lookup(key) if key else None
        if kept is not None:
            scores, path = kept
            message = (
                f"the bare model on {split}: the scores kept in {path} (same weights, examples and "
                "precision; --no-reuse-zero-shot scores it again)"
            )
            self.notify("phase", {"message": message})
            return scores, path
        self.notify(
            "phase",
            {"message": f"scoring the bare model on {split} ({len(data)} examples)", "total": len(data)},
        )
        with self.autocast(), self.strategy.evaluation():
            scores = evaluate(
                data, self.model, None, adapter=None, progress=lambda n: self.notify("progress", {"n": n})
            )
        if key and self.main:
            score_cache.store(
                key, scores, {"model": self.config.model, "split": split, "examples": len(data)}
            )
        return scores, None


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
    return Trainer(config, callback).fit()


def _diverged(loss: torch.Tensor, position: Position, scheduler: Any, out: Path, remove: bool = True) -> str:
    """Drop the checkpoint of the state that produced the bad loss (if `remove`: rank 0);
    say what to do next."""

    ckpts = list_checkpoints(out / "checkpoints")
    if ckpts and int(ckpts[-1].name.split("-")[1]) >= position.step:
        if remove:
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

    def __enter__(self) -> Self:

        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:

        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:

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


__all__ = ["TrainConfig", "TrainResult", "TrainState", "Trainer", "TrainingDiverged", "TrainingError",
           "TrainingInterrupted", "make_optimizer", "train"]  # fmt: skip
