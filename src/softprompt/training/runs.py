"""Setting up a training run: output folder, data, model, prompt and objectives."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import softprompt
from softprompt import devices, sharding
from softprompt._io import atomic_write_text
from softprompt.core.bf16 import resolve_bf16
from softprompt.core.config import PromptPosition, PromptTuningConfig, PromptTuningInit
from softprompt.core.model import SoftPromptModel
from softprompt.data import (
    BUILTIN,
    DataError,
    Example,
    examples_from_records,
    label_set,
    load_builtin,
    read_examples,
)
from softprompt.scoring.objectives import ClassificationObjective, GenerationObjective, Objective
from softprompt.settings import RECIPES, RUN_IDENTITY, TrainConfig, TrainingError
from softprompt.sharding import Strategy, distributed

if TYPE_CHECKING:
    from softprompt.settings import DataConfig

logger = logging.getLogger(__name__)

RUN_FILES = (
    "run_config.json",
    "metrics.jsonl",
    "plot.png",
    "results.json",
    "best",
    "last",
    "checkpoints",
    # --report-to's local data (softprompt.training.tracking)
    "tensorboard",
    "wandb",
    "mlflow.db",
)
DEFAULT_CLASSIFICATION_TEXT = "Classify the sentiment of the review as positive or negative."


@dataclass
class Run:
    model: SoftPromptModel
    tokenizer: Any
    train: Objective
    dev: Objective | None
    test: Objective | None
    info: dict[str, Any] = field(default_factory=dict)
    #: how the run spreads over processes, chosen once (`softprompt.sharding.strategy.choose`)
    strategy: Strategy = field(default_factory=lambda: Strategy(torch.device("cpu"), torch.float32))


@dataclass
class DataSpec:
    """The examples of a run and how to present them to the model."""

    task: str
    train: list[Any]
    dev: list[Any] | None
    test: list[Any] | None
    template: str
    label_words: dict[str, str] | None
    skipped: dict[str, int] = field(default_factory=dict)


def _error(message: str) -> Exception:
    return TrainingError(message)


def check_output_dir(config: TrainConfig) -> None:
    """Never mix two runs in one folder or delete a run without `overwrite`."""
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise _error(f"output_dir {out} is a file; give a folder.")
    saved = out / "run_config.json"
    if saved.exists():
        try:
            saved_info = json.loads(saved.read_text(encoding="utf-8"))
            previous = saved_info["config"]
            previous_world = int(saved_info.get("resolved", {}).get("world_size", 1))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            previous, previous_world = None, 1
        if config.resume:
            if previous is None:
                raise _error(
                    f"{saved} is unreadable, so the run cannot be resumed safely; use another output_dir."
                )
            mine = config.to_dict()
            diff = [k for k in RUN_IDENTITY if k != "grad_accum" and previous.get(k) != mine.get(k)]
            changes = [f"{k}: {previous.get(k)!r} -> {mine.get(k)!r}" for k in diff]
            # The global batch is batch_size x grad_accum x processes: another number of processes
            # continues the same run when grad_accum x processes is the same.
            world = distributed.world_size()
            before, now = previous.get("grad_accum", 1) * previous_world, config.grad_accum * world
            if before != now:
                need = before / world
                hint = f" (resume with --grad-accum {int(need)})" if need == int(need) and need >= 1 else ""
                was, is_ = (
                    f"{previous.get('grad_accum')} x {previous_world}",
                    f"{config.grad_accum} x {world}",
                )
                changes.append(f"grad_accum x processes: {was} -> {is_}{hint}")
            details = ", ".join(changes)
            if details:
                raise _error(
                    f"--resume with different settings than the run in {out} ({details}). "
                    "Resume with the same settings, or start a new run in another folder."
                )
            return
        if not config.overwrite:
            raise _error(
                f"{out} already holds a training run. Pass --resume to continue it, --overwrite to "
                "replace it, or choose another --output folder."
            )
    elif not config.overwrite:
        clash = [name for name in RUN_FILES if (out / name).exists()]
        if clash:
            raise _error(
                f"{out} already contains {clash} that softprompt did not write as a run; choose another "
                "--output folder (or --overwrite to replace them)."
            )
    if config.overwrite and not config.resume:
        for name in RUN_FILES:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()


def _sniff_task(path: str, config: DataConfig) -> str:
    """classification if the first record has the label field, generation if it has the target field."""

    for task in ("classification", "generation"):
        try:
            read_examples(
                path,
                task=task,
                text_field=config.text_field,
                label_field=config.label_field,
                target_field=config.target_field,
                skip_invalid=True,
            )
            return task
        except DataError:
            continue
    return "classification"  # let the real read below report the problem


def load_data(config: DataConfig, seed: int = 0) -> DataSpec:
    """Examples for train/dev/test, from a built-in set, files, or (Python API) records.

    Args:
        config: The data settings (a `TrainConfig` is one).
        seed: Chooses the 10% of a training file held out as dev when there is no dev file.
    """

    if not isinstance(config.data, (str, Path)):
        return _from_records(config)

    if config.data in BUILTIN:
        spec = BUILTIN[config.data]
        if config.task == "generation":
            raise _error(f"{config.data} is a classification data set; task must be classification.")
        opts = {
            "task": "classification",
            "text_field": config.text_field,
            "label_field": config.label_field,
            "skip_invalid": config.skip_invalid,
        }
        return DataSpec(
            task="classification",
            train=load_builtin(config.data, "train"),
            dev=read_examples(config.dev_data, **opts)[0]
            if config.dev_data
            else load_builtin(config.data, "dev"),
            test=read_examples(config.test_data, **opts)[0]
            if config.test_data
            else load_builtin(config.data, "test"),
            template=config.template or spec.template,
            label_words=config.label_words or dict(spec.label_words),
        )
    if not Path(config.data).exists():
        raise _error(
            f"data {config.data!r} is neither a built-in set ({', '.join(BUILTIN)}) nor an existing file."
        )
    task = config.task or _sniff_task(config.data, config)
    opts = {
        "task": task,
        "text_field": config.text_field,
        "label_field": config.label_field,
        "target_field": config.target_field,
        "skip_invalid": config.skip_invalid,
    }
    train, report = read_examples(config.data, **opts)
    skipped = dict(report.skipped)
    if config.dev_data:
        dev, _ = read_examples(config.dev_data, **opts)
    else:  # hold out 10% of the training file
        order = list(range(len(train)))
        random.Random(seed).shuffle(order)
        cut = max(1, len(train) // 10) if len(train) >= 10 else 0
        dev = [train[i] for i in sorted(order[:cut])] or None
        train = [train[i] for i in sorted(order[cut:])]
    test = read_examples(config.test_data, **opts)[0] if config.test_data else None
    label_words = None
    if task == "classification":
        labels = label_set(train)
        label_words = config.label_words or {label: f" {label}" for label in labels}
        missing = [label for label in labels if label not in label_words]
        if missing:
            raise _error(
                f"labels {missing} of {config.data} have no label word in label_words {label_words}."
            )
    return DataSpec(task, train, dev, test, config.template or "{text}", label_words, skipped)


def _from_records(config: DataConfig) -> DataSpec:
    """`data` / `dev_data` / `test_data` given as a `datasets.Dataset`, a list of dicts or of `Example`s."""

    def examples(records: Any, name: str) -> list[Any] | None:
        if records is None:
            return None
        rows = list(records)
        if rows and all(isinstance(r, Example) for r in rows):
            return rows
        task = config.task or ("generation" if rows and config.target_field in rows[0] else "classification")
        return examples_from_records(
            rows,
            task=task,
            text_field=config.text_field,
            label_field=config.label_field,
            target_field=config.target_field,
            skip_invalid=config.skip_invalid,
            source_name=name,
        )[0]

    train = examples(config.data, "data")
    if not train:
        raise _error("data holds no examples.")
    task = config.task or ("classification" if train[0].label is not None else "generation")
    dev = examples(config.dev_data, "dev_data")
    test = examples(config.test_data, "test_data")
    label_words = None
    if task == "classification":
        label_words = config.label_words or {label: f" {label}" for label in label_set(train)}
    return DataSpec(task, train, dev, test, config.template or "{text}", label_words)


def build_objective(
    spec: DataSpec, examples: list[Any] | None, tokenizer: Any, config: DataConfig
) -> Objective | None:
    """The objective (tokenized examples, label words) of one split, or None for no examples."""
    if not examples:
        return None
    texts = [e.text for e in examples]
    if spec.task == "classification":
        return ClassificationObjective.build(
            tokenizer, texts, [e.label for e in examples], spec.template, spec.label_words, config.max_length
        )
    return GenerationObjective.build(
        tokenizer,
        texts,
        [e.target for e in examples],
        spec.template,
        config.max_length,
        config.max_new_tokens,
    )


def prompt_config(config: TrainConfig, objective: Objective) -> PromptTuningConfig:
    """The prompt's configuration for this run (initialisation from the recipe; placed at the
    template's ``{prompt}`` marker when it has one)."""
    default = "CLASS_LABELS" if isinstance(objective, ClassificationObjective) else "SAMPLE_VOCAB"
    init = PromptTuningInit.parse(config.init or default, "init")
    kwargs: dict[str, Any] = {
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": config.num_virtual_tokens,
        "prompt_tuning_init": init,
        "tokenizer_name_or_path": config.model or "SmolLM2-135M-Instruct",
    }
    if init is PromptTuningInit.CLASS_LABELS:
        if not isinstance(objective, ClassificationObjective):
            raise _error(
                "init CLASS_LABELS needs classification data; use TEXT or SAMPLE_VOCAB for generation."
            )
        kwargs["prompt_tuning_init_text"] = list(objective.verbalizer.words)
    elif init is PromptTuningInit.TEXT:
        default = DEFAULT_CLASSIFICATION_TEXT if isinstance(objective, ClassificationObjective) else "Answer:"
        kwargs["prompt_tuning_init_text"] = config.init_text or default
    if objective.prompt_positions is not None:  # the template has {prompt}: the prompt goes there
        kwargs["prompt_position"] = PromptPosition.MARKER
    return PromptTuningConfig(**kwargs)


def resolve_recipe(config: TrainConfig) -> tuple[TrainConfig, str]:
    """`config` with its recipe applied (`settings.RECIPES`), and a line saying which and why.

    auto is short where the frozen model will train in float32 on a CPU without native
    bfloat16 (the full recipe's 6,400 examples take about 25 minutes on a 2-core AVX2 EPYC)
    and the user set none of the fields the short recipe sets (then their schedule is
    theirs), else full. A recipe sets only the fields still at their defaults. The
    returned config names the recipe it got (`recipe="full"` or `"short"`), so
    run_config.json records the values the run used.
    """
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    name, why = config.recipe, "as asked"
    if name == "auto":
        device = devices.resolve_device(config.device)
        float32_cpu = (
            device.type == "cpu"
            and devices.resolve_dtype(config.dtype, device) == torch.float32
            and not resolve_bf16(config.bf16, device)
        )
        own = [k for k in RECIPES["short"] if getattr(config, k) != defaults[k]]
        name = "short" if float32_cpu and not own else "full"
        if not float32_cpu:
            why = "because the model trains in bfloat16 or on a GPU"
        elif own:
            why = f"because you set {', '.join(own)}"
        else:
            why = "because this CPU trains in float32, without AMX or AVX512-BF16"
    changes = {k: v for k, v in RECIPES[name].items() if getattr(config, k) == defaults[k]}
    resolved = dataclasses.replace(config, recipe=name, **changes)
    steps = f"{resolved.max_steps} steps" if resolved.max_steps else f"{resolved.epochs:g} epochs"
    dev = f"{resolved.eval_samples} dev examples" if resolved.eval_samples else "the dev set"
    when = f"every {resolved.eval_every} steps" if resolved.eval_every else "at the end"
    line = f"recipe: {name}, {why}: {steps} of {resolved.batch_size} at lr {resolved.lr:g}, "
    line += f"{dev} scored {when}"
    if name == "short" and config.recipe == "auto":
        line += "; --recipe full for the full one"
    return resolved, line


def prepare_run(config: TrainConfig, notify: Callable[[str, dict[str, Any]], None]) -> Run:
    """Check the output folder, load data and model, attach a fresh prompt, write run_config.json."""

    device = devices.resolve_device(config.device)
    dtype = devices.resolve_dtype(config.dtype, device)
    strategy = sharding.choose(config.fsdp, config.zero3, device, dtype)  # (refuses both at once)
    out = Path(config.output_dir)
    if strategy.main:  # rank 0 checks (and with --overwrite clears) the folder
        try:
            check_output_dir(config)
            out.mkdir(parents=True, exist_ok=True)
        except Exception as err:
            distributed.broadcast_object(str(err))  # the other ranks stop with the same error
            raise
        distributed.broadcast_object(None)
    elif (error := distributed.broadcast_object(None)) is not None:
        raise _error(f"(rank 0) {error}")
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    notify("phase", {"message": f"loading data {config.data}"})
    spec = load_data(config, config.seed)
    if config.max_train_examples is not None:
        spec.train = spec.train[: config.max_train_examples]
    notify("phase", {"message": f"loading model {config.model or 'SmolLM2-135M-Instruct (packaged)'}"})
    base, tokenizer = strategy.load(config.model, notify)
    if config.gradient_checkpointing:
        # transformers 5.x renamed it (the old name warns and goes in v6)
        (getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable)()
    objectives = [
        build_objective(spec, part, tokenizer, config) for part in (spec.train, spec.dev, spec.test)
    ]
    train_obj, dev_obj, test_obj = objectives
    if train_obj is None:
        raise _error(f"no training examples in {config.data}.")
    strategy.shard(base, notify)  # before the prompt is added: see the strategies
    torch.manual_seed(config.seed)  # the prompt's initialisation depends on the seed only
    model = SoftPromptModel(base, prompt_config(config, train_obj), tokenizer=tokenizer)
    strategy.place_prompt(model)
    info = {
        "config": config.to_dict(),
        "resolved": {
            # bf16 autocast is for float32 weights; weights loaded in 16 bits compute in their dtype
            "bf16": resolve_bf16(config.bf16, model.device) if dtype == torch.float32 else bool(config.bf16),
            "device": str(device),
            "dtype": str(dtype).removeprefix("torch."),
            **strategy.describe(),
            "task": spec.task,
            "template": spec.template,
            "label_words": spec.label_words,
            "prompt": model.peft_config["default"].to_dict(),
            "train_examples": len(train_obj),
            "dev_examples": len(dev_obj) if dev_obj else 0,
            "test_examples": len(test_obj) if test_obj else 0,
            "skipped_rows": spec.skipped,
        },
        "versions": {
            "softprompt": softprompt.__version__,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
        },
    }
    if strategy.main and not (config.resume and (out / "run_config.json").exists()):
        atomic_write_text(out / "run_config.json", json.dumps(info, indent=2, default=str) + "\n")
    return Run(model, tokenizer, train_obj, dev_obj, test_obj, info, strategy)
