"""`softprompt`: train, evaluate, use and inspect soft prompts from the command line.

A thin shell over the Python API: `train` is `softprompt.training.train`, `eval` scores
adapters with `softprompt.scoring.objectives`, `generate` calls `SoftPromptModel.generate`,
`inspect` calls `softprompt.core.interpret`, `classify` and `serve` use `softprompt.scoring.classify`
and `softprompt.serve`. Option help comes from the same dataclass fields and docstrings.
This package is the only place that prints; errors become one-line messages.

Here: the parser and `main`. The commands live in `train_cmd` (train), `scoring` (eval,
classify), `using` (generate, inspect, serve); shared pieces in `options` (options from
the settings dataclasses), `adapters` (adapters named on the command line) and `output`
(progress and tables).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from transformers.utils import logging as hf_logging

from softprompt.cli.options import (
    ENSEMBLE_HELP,
    FROM_RUN,
    add_dataclass_options,
    allow_base_mismatch_option,
    model_and_data_options,
    parse_label_words,
    parse_seeds,
    unescape,
)
from softprompt.cli.scoring import cmd_classify, cmd_eval
from softprompt.cli.train_cmd import cmd_train
from softprompt.cli.using import cmd_generate, cmd_inspect, cmd_serve
from softprompt.serve.server import ServeConfig
from softprompt.serve.vllm_engine import VllmSettings
from softprompt.serve.vllm_process import VllmLaunch
from softprompt.settings import TRAIN_NOTES, ListenConfig
from softprompt.training.trainer import TrainConfig, TrainingDiverged, TrainingInterrupted

EXIT_ERROR, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 3, 130


def build_parser() -> argparse.ArgumentParser:

    parser = argparse.ArgumentParser(prog="softprompt", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="Show debug logging.")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_command(sub)
    _eval_command(sub)
    _generate_command(sub)
    _inspect_command(sub)
    _classify_command(sub)
    _serve_command(sub)
    return parser


def _train_command(sub: Any) -> None:
    """`softprompt train`: every `TrainConfig` field, `--output` and `--seeds`."""
    p = sub.add_parser("train", help="Train a soft prompt.", description=TrainConfig.__doc__)
    add_dataclass_options(p, TrainConfig, skip=("output_dir",), notes=TRAIN_NOTES)
    p.add_argument(
        "--output",
        "--output-dir",
        dest="output_dir",
        required=True,
        help=TrainConfig.__dataclass_fields__["output_dir"].metadata["help"],
    )
    p.add_argument(
        "--seeds",
        type=parse_seeds,
        default=None,
        help="Train one prompt per seed (e.g. 0,1,2; replaces --seed) into OUTPUT/seed-<k>/, then score the "
        "ensemble of their best prompts (one batched pass) next to each prompt in OUTPUT/results.json.",
    )
    p.set_defaults(func=cmd_train)


def _eval_command(sub: Any) -> None:
    """`softprompt eval`: adapters (and the bare model) scored on labelled data."""
    p = sub.add_parser("eval", help="Score adapters (and the bare model) on labelled data.")
    p.add_argument("--adapter", action="append", help="Adapter folder, or name=folder; repeat for several.")
    p.add_argument(
        "--zero-shot", action=argparse.BooleanOptionalAction, default=True, help="Also score the bare model."
    )
    p.add_argument("--split", default="test", help="Split of a built-in set: train, dev or test.")
    model_and_data_options(p)
    p.add_argument("--batch-size", type=int, default=64, help="Examples per forward pass.")
    p.add_argument("--limit", type=int, default=None, help="Score only the first N examples.")
    p.add_argument("--output", default=None, help="Write the results as JSON here.")
    p.add_argument("--ensemble", action="store_true", help=ENSEMBLE_HELP)
    allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_eval)


def _generate_command(sub: Any) -> None:
    """`softprompt generate`: text in, text out."""
    p = sub.add_parser("generate", help="Text in, text out, through one or more adapters.")
    p.add_argument("text", nargs="*", help="Input texts (default: one per line on standard input).")
    p.add_argument("--adapter", action="append", help="Adapter folder, or name=folder; repeat for several.")
    p.add_argument("--zero-shot", action="store_true", help="Also answer with the bare model.")
    model_and_data_options(p, only=("model", "device", "dtype", "template", "max_length", "max_new_tokens"))
    p.add_argument("--sample", action="store_true", help="Sample instead of greedy decoding.")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="Print JSON.")
    allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_generate)


def _inspect_command(sub: Any) -> None:
    """`softprompt inspect`: what a prompt learned."""
    p = sub.add_parser("inspect", help="What a prompt learned: nearest tokens, norms, similarity.")
    p.add_argument("adapter", help="Adapter folder.")
    p.add_argument("--compare", default=None, help="A second adapter folder to compare with.")
    model_and_data_options(p, only=("model",))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="Print JSON.")
    allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_inspect)


def _classify_command(sub: Any) -> None:
    """`softprompt classify`: labels for new texts."""
    p = sub.add_parser("classify", help="Label new texts with a classification prompt (no labels needed).")
    p.add_argument("text", nargs="*", help="Texts (default: --data, else one per line on standard input).")
    p.add_argument(
        "--adapter",
        action="append",
        required=True,
        help="Adapter folder (its run gives template and label words); several with --ensemble.",
    )
    p.add_argument(
        "--data", default=None, help="A .jsonl/.json file of objects, or a text file (a line each)."
    )
    p.add_argument("--text-field", default="text", help="The field holding the text in --data rows.")
    p.add_argument("--output", default=None, help="Write predictions as JSON lines here.")
    p.add_argument("--model", default=None, help="Model id or folder (default: the adapter's run).")
    p.add_argument("--template", type=unescape, default=None, help="Template with {text} " + FROM_RUN)
    p.add_argument("--label-words", type=parse_label_words, default=None, help="label=word,... " + FROM_RUN)
    p.add_argument("--max-length", type=int, default=None, help="Longest templated input " + FROM_RUN)
    p.add_argument("--batch-size", type=int, default=64, help="Texts per forward pass.")
    p.add_argument("--json", action="store_true", help="Print JSON.")
    p.add_argument("--ensemble", action="store_true", help=ENSEMBLE_HELP)
    allow_base_mismatch_option(p)
    p.set_defaults(func=cmd_classify)


def _serve_command(sub: Any) -> None:
    """`softprompt serve`: every `ServeConfig` field, where it listens, and vLLM."""
    p = sub.add_parser("serve", help="OpenAI-compatible server: one model, many soft prompts.")
    add_dataclass_options(p, ServeConfig)
    add_dataclass_options(p, ListenConfig)
    add_dataclass_options(p, VllmSettings, prefix="vllm_")
    add_dataclass_options(p, VllmLaunch, prefix="vllm_")
    p.set_defaults(func=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    logging.getLogger("softprompt").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    for noisy in ("transformers", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    hf_logging.disable_progress_bar()  # weight-loading bars; softprompt reports its own progress
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    try:
        return int(args.func(args) or 0)
    except TrainingInterrupted as err:
        sys.stderr.write(f"\n{err}\n")
        return EXIT_INTERRUPTED
    except TrainingDiverged as err:
        sys.stderr.write(f"\nerror: {err}\n")
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, RuntimeError, KeyError) as err:
        if args.verbose:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        sys.stderr.write(f"error: {message}\n")
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["build_parser", "main", "parse_label_words", "parse_seeds"]
