"""Command-line options built from the settings dataclasses (`softprompt.settings`): one
definition of each option's type, default and help for every command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from typing import Any

from softprompt.settings import DataConfig, ModelConfig


def parse_label_words(value: str) -> dict[str, str]:
    """JSON ('{"positive": " positive"}') or 'label=word,label=word' (a word keeps its spaces)."""
    value = value.strip()
    if value.startswith("{"):
        try:
            data = json.loads(value)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(f"label words are not valid JSON: {err}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise argparse.ArgumentTypeError("label words must map label names to words (strings).")
        return data
    out = {}
    for part in value.split(","):
        if "=" not in part:
            raise argparse.ArgumentTypeError(
                f"label words: {part!r} is not label=word (or give a JSON object)."
            )
        label, word = part.split("=", 1)
        out[label.strip()] = word
    return out


def parse_seeds(value: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]: distinct integer seeds."""
    try:
        seeds = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds: {value!r} is not a list of integers such as 0,1,2."
        ) from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"seeds: give distinct integers such as 0,1,2; got {value!r}.")
    return seeds


def _or_none(kind: type) -> Any:
    def parse(value: str) -> Any:
        return None if value.lower() in ("none", "null", "") else kind(value)

    parse.__name__ = kind.__name__
    return parse


def unescape(value: str) -> str:
    """Let '\\n' typed on a command line mean a newline (templates)."""
    return value.encode("utf-8").decode("unicode_escape") if "\\" in value else value


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: tuple[str, ...] = (),
    notes: dict[str, str] | None = None,
    only: tuple[str, ...] | None = None,
    prefix: str = "",
) -> None:
    """One `--option` per dataclass field, typed from the annotation, help from metadata.

    A field's metadata (`softprompt.settings.option`) may also give: `flag` (the option's
    name, if not the field's), `action` ("append" or "store_const" with `const`),
    `choices`, `cli_type` and `cli_default` (a value typed in other units, turned into the
    field's by `convert`, see `options_of`), `env` (read when the option is not given) and
    `cli=False` (not an option).

    Args:
        parser: The (sub)command's parser.
        cls: A settings dataclass (`softprompt.settings`).
        skip: Fields that are not options of this command.
        notes: Text appended to a field's help for this command (e.g. where its default comes from).
        only: If given, just these fields.
        prefix: Put before each field's name in its flag and in the parsed namespace, for
            a group whose names would clash with another's (`--vllm-url`: `vllm_url`).
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if f.name in skip or (only is not None and f.name not in only) or meta.get("cli") is False:
            continue
        dest = prefix + f.name
        flag = meta.get("flag") or "--" + dest.replace("_", "-")
        shown_as = {"metavar": flag.lstrip("-").replace("-", "_").upper()} if "flag" in meta else {}
        hint = hints[f.name]
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint)
        help_text = meta.get("help", "") + (f" {notes[f.name]}" if notes and f.name in notes else "")
        help_text = help_text.replace("%", "%%")  # argparse %-formats help texts
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        default = meta.get("cli_default", default)
        action = meta.get("action")
        if action == "append":  # repeated: a list of strings, the field's default when absent
            parser.add_argument(flag, dest=dest, action="append", default=None, help=help_text, **shown_as)
            continue
        if action == "store_const":
            parser.add_argument(
                flag, dest=dest, action="store_const", const=meta["const"], default=default, help=help_text
            )
            continue
        if base is bool:
            parser.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
            continue
        if "cli_type" in meta:
            conv: Any = meta["cli_type"]
        elif typing.get_origin(base) is dict or base is dict:
            conv = parse_label_words
        elif f.name in ("template", "init_text"):
            conv = unescape
        elif base in (int, float):
            conv = _or_none(base) if optional else base
        else:
            conv = str
        shown = f" (default: {str(default).replace('%', '%%')!r})" if default not in (None, "") else ""
        parser.add_argument(
            flag,
            dest=dest,
            type=conv,
            default=default,
            choices=meta.get("choices"),
            help=help_text + shown,
            **shown_as,
        )


FROM_RUN = "(default: the adapter's run)"

ENSEMBLE_HELP = (
    "Combine the --adapter prompts (two or more, trained with the same template and label words) into "
    "an ensemble: the mean of their label log-probabilities, all scored in one batched pass; each "
    "member is reported too."
)


def allow_base_mismatch_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="Load adapters saved from a different base model of the same width (refused by default).",
    )


_RUN_NOTES = {
    "model": "With an adapter: the model of its run.",
    "template": FROM_RUN,
    "label_words": FROM_RUN,
}


def model_and_data_options(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Model and data options of the commands that use an adapter: the same fields, defaults
    and help as `train` (`softprompt.settings`), defaults taken from the adapter's run."""

    add_dataclass_options(p, ModelConfig, notes=_RUN_NOTES, only=only)
    add_dataclass_options(p, DataConfig, skip=("dev_data", "test_data"), notes=_RUN_NOTES, only=only)


def options_of(args: argparse.Namespace, cls: type, prefix: str = "") -> dict[str, Any]:
    """The parsed options that are fields of settings dataclass `cls` (named `prefix` + field in
    `args`, see `add_dataclass_options`), as the field takes them: an option not given falls
    back to its `env` variable, a repeated one left out to the field's default, and a value
    typed in other units goes through the field's `convert`."""
    values = vars(args)
    out = {}
    for f in dataclasses.fields(cls):
        if prefix + f.name not in values:
            continue
        value = values[prefix + f.name]
        meta = f.metadata
        if value is None and meta.get("action") == "append":
            continue  # the field's own default
        if value in (None, "") and meta.get("env"):
            value = os.environ.get(meta["env"]) or None
        if "convert" in meta and value is not None:
            value = meta["convert"](value)
        out[f.name] = value
    return out
