"""Run settings, grouped: which model, how to read data and score it, the prompt, the
optimisation, evaluation and output. `TrainConfig` is all of them together (flat, so
`TrainConfig(lr=0.1, data="x.jsonl")` and every `softprompt train --option` map one to
one); `eval`, `generate`, `classify` and `serve` use the groups they need, with the same
defaults and help. `adapter_run` reads the settings an adapter was trained with.

The errors a run raises live here too, so the modules that prepare and drive a run
import them from one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from softprompt.core.config import PromptTuningInit

RUN_CONFIG = "run_config.json"


def option(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with help text (shown by the CLI's `--help`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: default.copy(), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _at_least_one(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if int(getattr(obj, name)) < 1:
            raise ValueError(f"{name} must be at least 1; got {getattr(obj, name)}.")


class TrainingError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite."""


class TrainingInterrupted(TrainingError):
    """Ctrl-C: a checkpoint was saved, the run can be resumed."""


REPORTERS = ("tensorboard", "wandb", "mlflow")


def parse_report_to(value: str | Sequence[str] | None) -> str:
    """`--report-to` as a canonical string: "none", or tracker names joined by commas.

    Raises:
        ValueError: An unknown tracker name, or "none" together with a tracker.
    """
    parts = value if isinstance(value, (list, tuple)) else str(value or "none").split(",")
    names = [p.strip().lower() for p in parts if p and p.strip()]
    if not names or names == ["none"]:
        return "none"
    bad = [n for n in names if n not in REPORTERS]
    if bad:
        raise ValueError(
            f"report_to must be none or one or more of {', '.join(REPORTERS)} (comma-separated); "
            f"got {value!r}."
        )
    return ",".join(dict.fromkeys(names))


# ---------------------------------------------------------------------- the groups
@dataclass
class BaseModelConfig:
    """Which frozen model, where it runs and in which dtype: shared by every command."""

    model: str | None = option(
        None, "Model id or local folder (default: the packaged SmolLM2-135M-Instruct)."
    )
    device: str = option(
        "auto",
        "auto, cpu, cuda, cuda:N or mps. auto: the first GPU if there is one (under torchrun or "
        "accelerate launch, the GPU of the process's LOCAL_RANK), else the CPU.",
    )
    dtype: str = option(
        "auto",
        "Dtype the frozen model is loaded in: auto, float32, bfloat16 or float16. auto: bfloat16 "
        "on a GPU that has it, float16 on one that does not, float32 on the CPU.",
    )

    def _validate_model(self) -> None:
        self.device = (self.device or "auto").strip().lower()
        self.dtype = (self.dtype or "auto").strip().lower()
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16; got {self.dtype!r}.")
        kind = self.device.split(":")[0]
        if kind not in ("auto", "cpu", "cuda", "mps") or (self.device.count(":") and kind != "cuda"):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps; got {self.device!r}.")


@dataclass
class ModelConfig(BaseModelConfig):
    """Which frozen model, and how it computes."""

    bf16: bool | None = option(
        None,
        "Run the frozen model under bfloat16 autocast; the prompt and optimizer stay float32 "
        "(default: on where the hardware computes bfloat16 natively: CPUs with AMX or "
        "AVX512-BF16, CUDA GPUs with bf16).",
    )


#: What `softprompt train` adds to the shared help of a field.
TRAIN_NOTES = {
    "dtype": "float16 trains with loss scaling; on the CPU see --bf16. The prompt and its optimizer "
    "state stay float32.",
}


@dataclass
class DataConfig:
    """How to read data and score it: shared by train, eval, classify and serve."""

    data: str = option(
        "movie-reviews",
        "Training data: a built-in set (movie-reviews, amazon-reviews, tweets, nyt-editorials) or a "
        "JSONL/CSV/TSV file. From Python also a datasets.Dataset or a list of dicts / Examples.",
    )
    dev_data: str | None = option(
        None,
        "Dev file for evaluation and early stopping (built-in sets have their own; else 10% of "
        "the training file).",
    )
    test_data: str | None = option(None, "Test file scored at the end (built-in sets have their own).")
    task: str | None = option(
        None, "classification or generation (default: classification if the data has labels)."
    )
    text_field: str = option("text", "Input text field / column.")
    label_field: str = option("label", "Label field / column (classification).")
    target_field: str = option("target", "Target text field / column (generation).")
    template: str | None = option(
        None,
        "Input template with {text} (built-in sets: 'Review: {text}\\nSentiment:'; files: '{text}').",
    )
    label_words: dict[str, str] | None = option(
        None, "Label -> label word, e.g. {'positive': ' positive'} (default: ' ' + label)."
    )
    max_length: int = option(256, "Longest templated input in tokens (longer texts are shortened).")
    max_new_tokens: int = option(32, "Generation task: tokens generated for evaluation.")
    skip_invalid: bool = option(False, "Skip bad data rows (counted and reported) instead of stopping.")

    def _validate_data(self) -> None:
        _at_least_one(self, ("max_length",))
        if self.task not in (None, "classification", "generation"):
            raise ValueError(f"task must be classification or generation; got {self.task!r}.")

    def __post_init__(self) -> None:
        self._validate_data()


@dataclass
class PromptOptions:
    """The prompt that is trained."""

    init: str | None = option(
        None,
        "Prompt initialisation: CLASS_LABELS, TEXT, SAMPLE_VOCAB or RANDOM (default: CLASS_LABELS "
        "for classification, SAMPLE_VOCAB for generation).",
    )
    init_text: str | None = option(None, "Text for TEXT initialisation (default: a task description).")
    num_virtual_tokens: int = option(
        50, "Prompt length N (the prompt's KV is computed once per step, so length is cheap)."
    )

    def _validate_prompt(self) -> None:
        if self.init is not None:
            self.init = PromptTuningInit.parse(self.init, "init").value
        _at_least_one(self, ("num_virtual_tokens",))


@dataclass
class OptimConfig:
    """How the prompt is optimised."""

    optimizer: str = option("adamw", "adamw or adafactor.")
    lr: float = option(3e-2, "Peak learning rate.")
    weight_decay: float = option(0.0, "Weight decay (AdamW).")
    warmup_steps: int = option(10, "Linear warm-up steps.")
    schedule: str = option("linear", "Learning-rate schedule after warm-up: linear, cosine or constant.")
    batch_size: int = option(32, "Examples per micro-batch.")
    grad_accum: int = option(1, "Micro-batches per optimizer step.")
    max_steps: int | None = option(200, "Optimizer steps (None: run `epochs` epochs).")
    epochs: float = option(1.0, "Epochs when max_steps is None.")
    seed: int = option(0, "Random seed (initialisation, data order).")
    gradient_checkpointing: bool = option(
        False, "Recompute activations in the backward pass (less memory, slower)."
    )
    max_train_examples: int | None = option(None, "Use at most this many training examples.")
    recipe: str = option(
        "auto",
        "auto, full or short. full: the defaults as shown (200 steps of 32 at lr 3e-2, the whole dev "
        "set every 100 steps). short: 96 steps of 16 at lr 8e-2, 512 dev examples scored at the end: "
        "a quarter of the examples, for machines that train the frozen model in float32 on a CPU (no "
        "AMX or AVX512-BF16), where the full recipe takes about 25 minutes on 2 cores. auto: short on "
        "such a CPU unless you set one of those options yourself, else full. The choice is printed.",
    )
    fsdp: bool = option(
        False,
        "Under torchrun / accelerate launch: shard the frozen model over the processes with PyTorch's "
        "FSDP (each keeps 1/N of every weight), for a model that does not fit one device; the prompt "
        "stays whole on every process. Same results as without it (no effect in one process).",
    )
    zero3: bool = option(
        False,
        "Under torchrun / accelerate launch: shard the frozen model over the processes with DeepSpeed "
        "ZeRO stage 3 instead of FSDP (pip install 'softprompt[deepspeed]'); the prompt stays whole on "
        "every process. On by itself under accelerate launch --use_deepspeed --zero_stage 3. Same "
        "results as without it (no effect in one process).",
    )

    def _validate_optim(self) -> None:
        _at_least_one(self, ("batch_size", "grad_accum"))
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be at least 1 (or None); got {self.max_steps}.")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number; got {self.lr}.")
        if self.optimizer not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer must be 'adamw' or 'adafactor'; got {self.optimizer!r}.")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant; got {self.schedule!r}.")
        self.recipe = (self.recipe or "auto").strip().lower()
        if self.recipe != "auto" and self.recipe not in RECIPES:
            raise ValueError(f"recipe must be auto, full or short; got {self.recipe!r}.")


@dataclass
class EvalConfig:
    """When and how a run is scored."""

    eval_every: int = option(100, "Evaluate on the dev set every N steps (0: only at the end).")
    eval_samples: int | None = option(None, "Dev examples used for these evaluations (None: all).")
    early_stopping_patience: int | None = option(
        None, "Stop after this many evaluations without improvement (None: never)."
    )
    zero_shot: bool = option(True, "Also score the bare model on the test set, for comparison.")
    reuse_zero_shot: bool = option(
        True,
        "Reuse the bare model's test scores kept by an earlier run with the same weights, examples, "
        "precision and versions (softprompt.training.score_cache) instead of scoring it again.",
    )


@dataclass
class OutputConfig:
    """Where a run is written and how it is kept safe."""

    output_dir: str = option("", "Folder for the adapters, metrics, plot and checkpoints (required).")
    checkpoint_every: int = option(50, "Write a resumable checkpoint every N steps.")
    keep_checkpoints: int = option(2, "How many checkpoints to keep.")
    resume: bool = option(False, "Continue an interrupted run from its newest checkpoint.")
    overwrite: bool = option(False, "Replace a finished or different run in output_dir.")
    log_every: int = option(10, "Write training loss to metrics.jsonl every N steps.")
    report_to: str = option(
        "none",
        "Also log training loss, learning rate, throughput and dev metrics (rank 0) to: tensorboard "
        "(events in output_dir/tensorboard; pip install 'softprompt[tracking]'), wandb (offline unless "
        "WANDB_MODE is set, in output_dir/wandb; pip install 'softprompt[wandb]'), mlflow "
        "(MLFLOW_TRACKING_URI, else output_dir/mlflow.db; pip install 'softprompt[mlflow]'), several "
        "comma-separated, or none.",
    )

    def _validate_output(self) -> None:
        self.report_to = parse_report_to(self.report_to)
        if not self.output_dir:
            raise ValueError("output_dir is required: the folder where the run is written.")
        _at_least_one(self, ("keep_checkpoints",))


@dataclass
class TrainConfig(EvalConfig, OptimConfig, PromptOptions, DataConfig, ModelConfig, OutputConfig):
    """Everything a training run needs. Every field is a `softprompt train` option."""

    def __post_init__(self) -> None:
        self._validate_output()
        self._validate_model()
        self._validate_data()
        self._validate_prompt()
        self._validate_optim()

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
                size = len(value) if hasattr(value, "__len__") else "?"
                value = f"<{type(value).__name__} of {size} records>"
            out[f.name] = value
        return out


#: The recipes `TrainConfig.recipe` names (besides auto, which picks one): the fields each
#: sets where the user left them at their defaults. The short one is for CPUs without native
#: bfloat16, measured on the built-in movie reviews with SmolLM2-135M-Instruct (README, "The
#: default recipe").
RECIPES: dict[str, dict[str, Any]] = {
    "full": {},
    "short": {"batch_size": 16, "max_steps": 96, "lr": 8e-2, "eval_every": 0, "eval_samples": 512},
}


# The fields that must match for `resume` to continue a run. The learning rate may change
# (the usual fix after a diverged run); evaluation and checkpoint settings may too.
RUN_IDENTITY = ("model", "data", "task", "template", "label_words", "init", "init_text", "num_virtual_tokens",
                "optimizer", "weight_decay", "warmup_steps", "schedule", "batch_size", "grad_accum",
                "max_steps", "epochs", "seed", "bf16", "max_length", "max_train_examples")  # fmt: skip


# ---------------------------------------------------------------------- serving
def named_folders(values: Sequence[str] | None) -> list[tuple[str, Path]]:
    """'name=folder' or 'folder' (named after its last two path parts) -> (name, folder),
    names made unique (a trailing '_' per repeat) and safe (letters, digits, '_', '-')."""
    named: list[tuple[str, Path]] = []
    for value in values or []:
        name, _, path = value.rpartition("=") if "=" in value else ("", "", value)
        folder = Path(path)
        if not name:
            name = "_".join(part for part in folder.resolve().parts[-2:] if part not in ("/",))
        name = "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name)[:64] or "adapter"
        while name in [n for n, _ in named]:
            name += "_"
        named.append((name, folder))
    return named


def _adapters_by_name(values: Sequence[str] | None) -> dict[str, str]:
    return {name: str(folder) for name, folder in named_folders(values)}


def _megabytes(value: float) -> int:
    return int(value * 2**20)


@dataclass
class ServedAdapters:
    """Which adapters a server serves from the start, and which it may load later."""

    adapters: dict[str, str] = option(
        {},
        "name=folder (or folder); repeat for several.",
        flag="--adapter",
        action="append",
        convert=_adapters_by_name,
    )
    adapters_dirs: list[str] = option(
        [],
        "Serve every adapter folder under DIR by folder name (also those added later, on their first "
        "request).",
        flag="--adapters",
        action="append",
    )
    adapter_roots: list[str] = option(
        [], "A further folder /v1/load_adapter may load from.", flag="--adapter-root", action="append"
    )
    allow_adapter_updates: bool = option(False, "Enable /v1/load_adapter and /v1/unload_adapter.")
    allow_base_mismatch: bool = option(
        False, "Load adapters saved from a different base model of the same width (refused by default)."
    )


@dataclass
class BatchingConfig:
    """How the built-in engine batches requests."""

    max_batch_size: int = option(32, "Sequences decoded together at most.")
    max_queue: int = option(256, "Waiting requests at most (then 429).")
    prompt_cache_mb: float | None = option(None, "Memory for prompt KVs, least recently used dropped first.")
    packed: bool | None = option(
        None,
        "Decode in left-padded batches with separate prefill passes instead of packed steps.",
        flag="--padded-batches",
        action="store_const",
        const=False,
    )
    prefill_tokens: int = option(256, "Prompt tokens prefilled per step at most (packed steps).")

    def _validate_batching(self) -> None:
        _at_least_one(self, ("max_batch_size", "prefill_tokens"))


@dataclass
class HttpConfig:
    """What clients of a server see: the bare model's name, the key, the limits."""

    base_id: str | None = option(
        None,
        "The base model's name in requests (default: --model, or the default model's name).",
        flag="--served-model-name",
    )
    api_key: str | None = option(
        None, "Require this bearer key on /v1 routes (or SOFTPROMPT_API_KEY).", env="SOFTPROMPT_API_KEY"
    )
    max_body_bytes: int = option(
        1 << 20,
        "Larger request bodies get 413, in MB.",
        flag="--max-body-mb",
        cli_type=float,
        cli_default=1.0,
        convert=_megabytes,
    )
    drain_seconds: float = option(30.0, "Time running requests get to finish at shutdown.")


@dataclass
class ListenConfig:
    """Where a server listens (uvicorn's address)."""

    host: str = option("127.0.0.1", "Address to listen on.")
    port: int = option(8000, "Port to listen on.")


# ---------------------------------------------------------------------- an adapter's run
@dataclass(frozen=True)
class AdapterRun:
    """What an adapter's training run recorded about its input format (run_config.json).

    Attributes:
        model: The base model the run used (None: the packaged default).
        task: classification or generation.
        template: The input template with `{text}`.
        label_words: Label -> label word (classification).
        max_length: Longest templated input in tokens.
        source: The run_config.json read.
    """

    model: str | None = None
    task: str | None = None
    template: str | None = None
    label_words: dict[str, str] | None = None
    max_length: int | None = None
    source: Path | None = None


def adapter_run(adapter_dir: str | Path) -> AdapterRun | None:
    """The settings of the run an adapter folder came from: `run_config.json` in the folder
    or its parent (a run's `best/` and `last/`), else None (a PEFT adapter, a copied folder).

    Raises:
        ValueError: The run_config.json exists but cannot be read.
    """
    folder = Path(adapter_dir)
    for candidate in (folder / RUN_CONFIG, folder.parent / RUN_CONFIG):
        if candidate.is_file():
            try:
                info = json.loads(candidate.read_text(encoding="utf-8"))
                resolved, config = info.get("resolved", {}), info.get("config", {})
            except (OSError, ValueError, AttributeError) as err:
                raise ValueError(
                    f"{candidate} cannot be read ({err}); pass --template/--label-words explicitly "
                    "or repair the file."
                ) from None
            return AdapterRun(
                model=config.get("model"),
                task=resolved.get("task"),
                template=resolved.get("template"),
                label_words=resolved.get("label_words"),
                max_length=config.get("max_length"),
                source=candidate,
            )
    return None
