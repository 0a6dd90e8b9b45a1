"""Labelled examples from user files (JSONL, CSV, TSV) and from in-memory records.

`read_examples` turns a data file into a list of `Example` objects and a `SkipReport`;
`examples_from_records` does the same for a list of dicts or a Hugging Face
`datasets.Dataset`. Both are strict by default: the first bad row raises a `DataError`
whose message names the file, the 1-based line and the field, says what was found and
how to fix it. With ``skip_invalid=True`` bad rows are skipped and counted by reason.

Files must be UTF-8 (a leading byte-order mark is accepted). Lines may end in LF or
CRLF. JSONL: one JSON object per line, blank lines ignored. CSV / TSV: read with the
`csv` module (standard double-quote quoting), the first row is the header.

The built-in sentiment sets (`BUILTIN`, `load_builtin`) live in `softprompt.data.builtin`
and are re-exported here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("classification", "generation")
FORMATS = ("jsonl", "csv", "tsv")
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_DELIMITERS = {"csv": ",", "tsv": "\t"}


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Attributes:
        text: The input text (classification input or generation input), kept as read.
        label: Classification: the label name, e.g. ``"positive"`` (whitespace stripped).
        target: Generation: the expected output text.
        source: Where it came from, ``"path:line"``, for messages.
    """

    text: str
    label: str | None = None
    target: str | None = None
    source: str = ""


class DataError(ValueError):
    """A data file or record is unusable; the message names the file, line and field.

    Attributes:
        path: The file (or record source name) at fault.
        line: 1-based line (row for records), or None for problems with the whole file.
        field: The field at fault, or None.
    """

    def __init__(
        self, message: str, *, path: str | None = None, line: int | None = None, field: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.line = line
        self.field = field


@dataclass
class SkipReport:
    """Rows skipped by ``skip_invalid=True``, counted by reason.

    Attributes:
        skipped: Reason -> count, e.g. ``{"missing field 'label'": 3, "empty text": 1}``.
    """

    skipped: dict[str, int] = field(default_factory=dict)

    def add(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def total(self) -> int:
        """Number of rows skipped."""
        return sum(self.skipped.values())

    def summary(self) -> str:
        """One line for humans, e.g. ``"skipped 4 rows (missing field 'label': 3, empty text: 1)"``."""
        if not self.skipped:
            return "no rows skipped"
        total = self.total()
        parts = sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        reasons = ", ".join(f"{reason}: {count}" for reason, count in parts)
        return f"skipped {total} row{'s' if total != 1 else ''} ({reasons})"


@dataclass(frozen=True)
class _Options:
    task: str
    text_field: str
    label_field: str
    target_field: str
    labels: frozenset[str] | None
    skip_invalid: bool
    max_chars: int


class _RowError(Exception):
    """A problem with one row: `reason` is the SkipReport key, `detail` the human explanation."""

    def __init__(self, reason: str, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.field = field


_Row = Mapping[str, Any] | _RowError


def _options(
    task: str,
    text_field: str,
    label_field: str,
    target_field: str,
    labels: Sequence[str] | None,
    skip_invalid: bool,
    max_chars: int,
) -> _Options:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}; got {task!r}.")
    names = {"text_field": text_field, "label_field": label_field, "target_field": target_field}
    for name, value in names.items():
        if not isinstance(value, str) or not value:
            raise TypeError(f"{name} must be a non-empty string (a field or column name); got {value!r}.")
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be a positive integer; got {max_chars!r}.")
    allowed = None
    if labels is not None:
        if isinstance(labels, str) or not all(isinstance(x, str) and x.strip() for x in labels):
            raise TypeError(
                "labels must be a list of non-empty label names such as ['negative', "
                f"'positive']; got {labels!r}."
            )
        if task != "classification":
            raise ValueError(
                f"labels only applies to task='classification'; got task={task!r}. Remove labels."
            )
        allowed = frozenset(x.strip() for x in labels)
    return _Options(task, text_field, label_field, target_field, allowed, bool(skip_invalid), max_chars)


def _required(row: Mapping[str, Any], name: str, keyword: str) -> Any:
    value = row.get(name)
    if value is None:
        fields = sorted(str(k) for k in row)
        raise _RowError(
            f"missing field {name!r}",
            f"missing (the row has fields {fields}); if it is stored "
            f"under another name, pass {keyword}='...'",
            name,
        )
    return value


def _string(row: Mapping[str, Any], name: str, keyword: str, what: str, max_chars: int) -> str:
    value = _required(row, name, keyword)
    if not isinstance(value, str):
        raise _RowError(
            f"wrong type for field {name!r}",
            f"must be a string; got {type(value).__name__} {value!r:.80}",
            name,
        )
    if not value.strip():
        raise _RowError(f"empty {what}", f"{what} is empty or only whitespace ({value!r})", name)
    if len(value) > max_chars:
        raise _RowError(
            f"{what} longer than max_chars",
            f"{what} of {len(value)} characters exceeds max_chars={max_chars}; shorten it or raise max_chars",
            name,
        )
    return value


def _convert(row: Mapping[str, Any], opts: _Options, source: str) -> Example:
    text = _string(row, opts.text_field, "text_field", "text", opts.max_chars)
    if opts.task == "generation":
        target = _string(row, opts.target_field, "target_field", "target", opts.max_chars)
        return Example(text=text, target=target, source=source)
    name = opts.label_field
    value = _required(row, name, "label_field")
    if isinstance(value, float) or not isinstance(value, (str, int)):  # bool is an int
        found = f"{type(value).__name__} {value!r:.80}"
        raise _RowError(
            f"wrong type for field {name!r}",
            f"a label must be a string, integer or boolean; got {found}",
            name,
        )
    label = str(value).strip()
    if not label:
        raise _RowError("empty label", f"label is empty or only whitespace ({value!r})", name)
    if opts.labels is not None and label not in opts.labels:
        raise _RowError(
            "label not in labels",
            f"label {label!r} is not one of the allowed labels "
            f"{sorted(opts.labels)}; fix the row or add the label to labels",
            name,
        )
    return Example(text=text, label=label, source=source)


def _collect(
    rows: Iterable[tuple[int, _Row]], name: str, opts: _Options, unit: str = "line"
) -> tuple[list[Example], SkipReport]:
    """Convert (line, row) pairs, raising or skipping bad rows as `opts` says."""
    examples: list[Example] = []
    report = SkipReport()
    seen = 0
    for line, row in rows:
        seen += 1
        try:
            if isinstance(row, _RowError):
                raise row
            examples.append(_convert(row, opts, f"{name}:{line}"))
        except _RowError as err:
            where = f"{name}, {unit} {line}" + (f", field {err.field!r}" if err.field else "")
            if not opts.skip_invalid:
                raise DataError(f"{where}: {err.detail}.", path=name, line=line, field=err.field) from None
            report.add(err.reason)
            logger.debug("Skipping %s: %s", where, err.detail)
    if seen == 0:
        raise DataError(f"{name} has no rows: it holds no examples.", path=name)
    if not examples:
        raise DataError(
            f"no usable rows in {name}: {report.summary()}. Fix the rows or check the field "
            f"names (text_field={opts.text_field!r}).",
            path=name,
        )
    if report.total():
        logger.warning("%s: %s; %d examples kept.", name, report.summary(), len(examples))
    return examples, report


def _decode(path: Path, name: str) -> str:
    """The file's text; a problem with the whole file raises DataError."""
    if not path.exists():
        raise DataError(f"data file {name} does not exist; check the path.", path=name)
    if path.is_dir():
        raise DataError(
            f"data file {name} is a folder; give the path of a .jsonl, .csv or .tsv file.", path=name
        )
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read data file {name}: {err}.", path=name) from None
    if not data:
        raise DataError(f"data file {name} is empty (0 bytes).", path=name)
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise DataError(f"{name} is UTF-16 encoded; data files must be UTF-8. Save it as UTF-8.", path=name)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        # The line holding the bad bytes: count the newlines before them.
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{name}, line {line}: invalid UTF-8 (bytes {data[err.start : err.end + 3]!r}); "
            "data files must be "
            "UTF-8. Convert it, for example with `iconv -f latin1 -t utf-8`.",
            path=name,
            line=line,
        ) from None
    return text.removeprefix("\ufeff")


def _jsonl_rows(text: str) -> Iterator[tuple[int, _Row]]:
    # Split on "\n" only: str.splitlines() would also split on U+2028 and friends, which JSON
    # strings may contain raw.
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _RowError("malformed JSON", f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        except RecursionError:
            yield number, _RowError("malformed JSON", "malformed JSON (nested too deeply)")
            continue
        except ValueError as err:  # an integer literal longer than sys.get_int_max_str_digits()
            yield number, _RowError("malformed JSON", f"malformed JSON ({err})")
            continue
        if not isinstance(value, dict):
            yield (
                number,
                _RowError(
                    "not a JSON object",
                    'expected a JSON object such as {"text": ...}; '
                    f"got a {type(value).__name__} (the file must hold one object per line)",
                ),
            )
            continue
        yield number, value


def _csv_rows(text: str, name: str, delimiter: str, required: list[str]) -> Iterator[tuple[int, _Row]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    end = 0  # last physical line consumed; a record may span several lines
    try:
        for record in reader:
            start, end = end + 1, reader.line_num
            if not record:
                continue  # blank line
            if header is None:
                header = [column.strip() for column in record]
                _check_header(header, required, name, start)
            elif len(record) != len(header):
                yield (
                    start,
                    _RowError(
                        "wrong number of columns",
                        f"{len(record)} columns, but the header "
                        f"has {len(header)} {header}; quote values that contain {delimiter!r}",
                    ),
                )
            else:
                yield start, dict(zip(header, record))
    except csv.Error as err:
        line = reader.line_num
        kind = "TSV" if delimiter == "\t" else "CSV"
        raise DataError(
            f"{name}, line {line}: cannot parse as {kind}: {err}.", path=name, line=line
        ) from None


def _check_header(header: list[str], required: list[str], name: str, line: int) -> None:
    for column in required:
        if column not in header:
            raise DataError(
                f"{name}: column {column!r} is missing from the header (line {line}); the header "
                f"has columns {header}. Rename the column or pass the matching "
                "text_field/label_field/target_field.",
                path=name,
                line=line,
                field=column,
            )
        if header.count(column) > 1:
            raise DataError(
                f"{name}: column {column!r} appears {header.count(column)} times in the header "
                f"{header}; rename the duplicates.",
                path=name,
                line=line,
                field=column,
            )


def read_examples(
    path: str | os.PathLike,
    *,
    task: str = "classification",
    text_field: str = "text",
    label_field: str = "label",
    target_field: str = "target",
    labels: Sequence[str] | None = None,
    skip_invalid: bool = False,
    max_chars: int = 100_000,
    format: str | None = None,
) -> tuple[list[Example], SkipReport]:
    """Read the examples of a JSONL, CSV or TSV file.

    Args:
        path: The data file.
        task: ``"classification"`` (text + label) or ``"generation"`` (text + target).
        text_field: Field (JSONL key or CSV column) holding the input text.
        label_field: Classification: field holding the label (a string, integer or
            boolean, converted with `str` and stripped).
        target_field: Generation: field holding the expected output text.
        labels: Allowed label names; a row with another label is an error.
        skip_invalid: Skip bad rows and count them in the report instead of raising.
        max_chars: Longest accepted text (and target), in characters.
        format: ``"jsonl"``, ``"csv"`` or ``"tsv"``; None: from the extension
            (``.jsonl``/``.json``, ``.csv``, ``.tsv``).

    Returns:
        The examples in file order, and the report of skipped rows.

    Raises:
        DataError: A problem with the whole file (missing, a folder, empty, not UTF-8,
            CSV column missing from the header, no usable rows), or, unless
            `skip_invalid`, with a row.
        ValueError: An invalid argument.
    """
    opts = _options(task, text_field, label_field, target_field, labels, skip_invalid, max_chars)
    path = Path(path)
    name = str(path)
    fmt = format
    if fmt is None:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"cannot tell the format of {name} from its extension {path.suffix!r}; use "
                ".jsonl, .json, .csv or .tsv, or pass format='jsonl', 'csv' or 'tsv'.",
                path=name,
            )
    elif fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r} for {name}; valid formats are {list(FORMATS)}.", path=name)
    text = _decode(path, name)
    if fmt == "jsonl":
        rows = _jsonl_rows(text)
    else:
        second = opts.target_field if opts.task == "generation" else opts.label_field
        rows = _csv_rows(text, name, _DELIMITERS[fmt], [opts.text_field, second])
    return _collect(rows, name, opts)


def examples_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    task: str = "classification",
    text_field: str = "text",
    label_field: str = "label",
    target_field: str = "target",
    labels: Sequence[str] | None = None,
    skip_invalid: bool = False,
    max_chars: int = 100_000,
    source_name: str = "records",
) -> tuple[list[Example], SkipReport]:
    """Examples from rows held in memory: a list of dicts or a Hugging Face ``datasets.Dataset``.

    Rows are checked exactly as by `read_examples`; a row's "line" is its index + 1 and its
    source is ``"<source_name>:<index + 1>"``.

    Args:
        records: The rows, each a mapping from field name to value.
        source_name: Name used for the rows in messages and `Example.source`.

    `task`, `text_field`, `label_field`, `target_field`, `labels`, `skip_invalid` and
    `max_chars` are as for `read_examples`.

    Returns:
        The examples in order, and the report of skipped rows.
    """
    if isinstance(records, (str, bytes, Mapping)):
        raise TypeError(
            f"records must be an iterable of rows (dicts), such as a list of dicts or a "
            f"datasets.Dataset; got a {type(records).__name__}. For a dict of columns, pass "
            "datasets.Dataset.from_dict(columns) or a list of row dicts."
        )
    opts = _options(task, text_field, label_field, target_field, labels, skip_invalid, max_chars)

    def rows() -> Iterator[tuple[int, _Row]]:
        for index, record in enumerate(records):
            if isinstance(record, Mapping):
                yield index + 1, record
            else:
                found = f"{type(record).__name__} {record!r:.80}"
                yield (
                    index + 1,
                    _RowError("not a mapping", f"expected a mapping of field names to values; got {found}"),
                )

    return _collect(rows(), source_name, opts, unit="row")


def label_set(examples: Iterable[Example]) -> list[str]:
    """The sorted unique labels of `examples` (examples without a label are ignored)."""
    return sorted({e.label for e in examples if e.label is not None})


__all__ = [
    "DataError",
    "Example",
    "SkipReport",
    "examples_from_records",
    "label_set",
    "read_examples",
]
