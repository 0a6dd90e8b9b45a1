"""Fuzzed data files for `read_examples`: every row is built with a known fate.

Each generated line records what `read_examples` must make of it: an example (with the
exact text and label/target), a bad row (with the SkipReport reason and the field at
fault), a blank line, or a whole-file error (invalid UTF-8). The expected outcome of the
file follows from that bookkeeping alone, so the tests compare against a model built
independently of the reader, including the line numbers, not against the reader itself.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from softprompt.data import DataError, Example, read_examples

MAX_CHARS = 30
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Invalid UTF-8 at a character boundary: stray continuation byte, bytes never used,
# overlong encoding, encoded surrogate, truncated sequences (followed by ASCII, a lead
# byte, a newline or the end of the file, never by a continuation byte).
BAD_UTF8 = [
    b"\x80",
    b"\xbf",
    b"\xff",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xc3",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xf8\x88\x80\x80\x80",
]


@dataclasses.dataclass
class Line:
    """One row of the file (a CSV row may span several physical lines) and its fate."""

    content: str
    status: str  # "ok", "bad", "blank"
    reason: str | None = None  # SkipReport key for "bad"
    field: str | None = None  # DataError.field for "bad"
    value: tuple[str, str] | None = None  # (text, label or target) for "ok"
    swallows_rest: bool = False  # CSV: an unclosed quote takes the rest of the file


@dataclasses.dataclass(frozen=True)
class Fields:
    task: str
    text: str
    second: str  # the label field (classification) or the target field (generation)

    @property
    def what(self) -> str:
        return "label" if self.task == "classification" else "target"

    def options(self) -> dict:
        key = "label_field" if self.task == "classification" else "target_field"
        return {"task": self.task, "text_field": self.text, key: self.second, "max_chars": MAX_CHARS}


fields_st = st.builds(
    Fields,
    task=st.sampled_from(["classification", "generation"]),
    text=st.sampled_from(["text", "sentence", "ünï"]),
    second=st.sampled_from(["label", "target", "y"]),
).filter(lambda f: f.text != f.second)

# ---------------------------------------------------------------------- values
_chars = st.characters(blacklist_categories=("Cs",))
_csv_chars = st.one_of(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\r"),
    st.sampled_from(list('",\t\n "')),
)


def _nonblank(chars, max_size):
    return st.text(chars, max_size=max_size - 1).map(lambda s: s if s.strip() else s + "x")


def _long(chars):
    return st.text(chars, min_size=MAX_CHARS + 1, max_size=MAX_CHARS + 40).map(
        lambda s: s if s.strip() else "x" + s[1:]
    )


_blank = st.text(st.sampled_from(list(" \t\n\u3000\u2028\x0b\x0c\x1c\x85\xa0")), max_size=4)
_csv_blank = st.text(st.sampled_from(list(" \t\n\u3000\xa0")), max_size=4)
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5))
_json_values = st.recursive(
    _json_scalars,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=6,
)


def _csv_cell(value: str, delimiter: str, force_quote: bool) -> str:
    if force_quote or any(c in value for c in (delimiter, '"', "\n")):
        return '"' + value.replace('"', '""') + '"'
    return value


# ---------------------------------------------------------------------- JSONL rows
JSONL_KINDS = [
    "ok", "ok", "ok", "ok", "ok", "ok", "missing-text", "missing-second", "null-text", "type-text",
    "type-second", "blank-text", "blank-second", "long-text", "long-second", "not-object", "malformed",
    "bom", "huge-int", "deep", "blank",
]  # fmt: skip


@st.composite
def jsonl_line(draw, f: Fields) -> Line:
    kind = draw(st.sampled_from(JSONL_KINDS))
    if kind == "blank":
        return Line(draw(st.text(st.sampled_from(" \t"), max_size=3)), "blank")
    text = draw(_nonblank(_chars, MAX_CHARS))
    if f.task == "classification":
        raw = draw(_nonblank(_chars, 12) | st.integers() | st.booleans())
        second, expected_second = raw, str(raw).strip()
    else:
        second = expected_second = draw(_nonblank(_chars, MAX_CHARS))
    obj = {f.text: text, f.second: second}
    for key in draw(st.lists(st.sampled_from(["id", "note", "meta"]), max_size=2, unique=True)):
        obj[key] = draw(_json_values)
    line = Line("", "ok", value=(text, expected_second))
    text_fault = {"field": f.text, "status": "bad"}
    second_fault = {"field": f.second, "status": "bad"}
    if kind == "missing-text":
        del obj[f.text]
        line = Line("", reason=f"missing field {f.text!r}", **text_fault)
    elif kind == "null-text":
        obj[f.text] = None
        line = Line("", reason=f"missing field {f.text!r}", **text_fault)
    elif kind == "missing-second":  # absent, or null
        if draw(st.booleans()):
            del obj[f.second]
        else:
            obj[f.second] = None
        line = Line("", reason=f"missing field {f.second!r}", **second_fault)
    elif kind == "type-text":
        obj[f.text] = draw(
            st.integers()
            | st.floats()
            | st.booleans()
            | st.lists(st.text(max_size=3), max_size=2)
            | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
        )
        line = Line("", reason=f"wrong type for field {f.text!r}", **text_fault)
    elif kind == "type-second":
        bad = (
            st.floats()
            | st.lists(st.text(max_size=3), max_size=2)
            | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
        )
        if f.task == "generation":
            bad = bad | st.integers() | st.booleans()
        obj[f.second] = draw(bad)
        line = Line("", reason=f"wrong type for field {f.second!r}", **second_fault)
    elif kind == "blank-text":
        obj[f.text] = draw(_blank)
        line = Line("", reason="empty text", **text_fault)
    elif kind == "blank-second":
        obj[f.second] = draw(_blank)
        line = Line("", reason=f"empty {f.what}", **second_fault)
    elif kind == "long-text":
        obj[f.text] = draw(_long(_chars))
        line = Line("", reason="text longer than max_chars", **text_fault)
    elif kind == "long-second":
        if f.task == "classification":  # labels have no length limit: a long one is fine
            obj[f.second] = draw(_long(_chars))
            line = Line("", "ok", value=(text, obj[f.second].strip()))
        else:
            obj[f.second] = draw(_long(_chars))
            line = Line("", reason="target longer than max_chars", **second_fault)
    items = draw(st.permutations(list(obj.items())))
    content = json.dumps(dict(items), ensure_ascii=draw(st.booleans()))
    if kind == "not-object":
        content = json.dumps(
            draw(st.lists(_json_values, max_size=3) | _json_scalars.filter(lambda v: v != ""))
        )
        if not content.strip():
            content = "[]"
        line = Line("", "bad", reason="not a JSON object")
    elif kind == "malformed":
        cut = draw(st.integers(1, len(content) - 1))
        content = (
            content[:cut]
            if draw(st.booleans())
            else content + draw(st.sampled_from(["}", ",", "x", " 1", "{}"]))
        )
        line = Line("", "bad", reason="malformed JSON")
    elif kind == "bom":  # a byte-order mark is only accepted at the start of the file
        content = "\ufeff" + content
        line = Line("", "bad", reason="malformed JSON")
    elif kind == "huge-int":  # past sys.get_int_max_str_digits(): json raises a plain ValueError
        content = json.dumps({f.text: "a", f.second: 0})[:-2] + "7" * draw(st.integers(4301, 6000)) + "}"
        line = Line("", "bad", reason="malformed JSON")
    elif kind == "deep":
        content = "[" * draw(st.integers(10_000, 100_000))
        line = Line("", "bad", reason="malformed JSON")
    pad = draw(st.sampled_from(["", " ", "\t"]))
    line.content = pad + content + draw(st.sampled_from(["", " "]))
    return line


# ---------------------------------------------------------------------- CSV/TSV rows
CSV_KINDS = [
    "ok", "ok", "ok", "ok", "ok", "ok", "stray-quote", "blank-text", "blank-second", "long-text",
    "long-second", "extra-column", "missing-column", "spaces-line", "blank",
]  # fmt: skip


@st.composite
def csv_line(draw, f: Fields, columns: list[str], delimiter: str) -> Line:
    kind = draw(st.sampled_from(CSV_KINDS))
    if kind == "blank":
        return Line("", "blank")
    if kind == "spaces-line":  # one column, where the header has two or more
        return Line(
            draw(st.text(st.sampled_from(" \u3000"), min_size=1, max_size=3)),
            "bad",
            reason="wrong number of columns",
        )
    text = draw(_nonblank(_csv_chars, MAX_CHARS))
    second = draw(_nonblank(_csv_chars, 12 if f.task == "classification" else MAX_CHARS))
    values = {c: draw(st.text(_csv_chars, max_size=6)) for c in columns}
    values[f.text], values[f.second] = text, second
    line = Line("", "ok", value=(text, second.strip() if f.task == "classification" else second))
    raw_text = None
    if kind == "stray-quote":  # a quote inside an unquoted cell is kept as it is
        head = draw(st.text(st.sampled_from("abc xyz"), min_size=1, max_size=5)).replace(" ", "") or "a"
        text = head + '"' + draw(st.text(st.sampled_from('ab"c '), max_size=5))
        values[f.text], raw_text = text, text
        line = Line("", "ok", value=(text, line.value[1]))
    elif kind == "blank-text":
        values[f.text] = draw(_csv_blank)
        line = Line("", "bad", reason="empty text", field=f.text)
    elif kind == "blank-second":
        values[f.second] = draw(_csv_blank)
        line = Line("", "bad", reason=f"empty {f.what}", field=f.second)
    elif kind == "long-text":
        values[f.text] = draw(_long(_csv_chars))
        line = Line("", "bad", reason="text longer than max_chars", field=f.text)
    elif kind == "long-second":
        values[f.second] = draw(_long(_csv_chars))
        if f.task == "classification":
            line = Line("", "ok", value=(text, values[f.second].strip()))
        else:
            line = Line("", "bad", reason="target longer than max_chars", field=f.second)
    cells = [
        raw_text
        if c == f.text and raw_text is not None
        else _csv_cell(values[c], delimiter, draw(st.booleans()))
        for c in columns
    ]
    if kind == "extra-column":
        cells.append(draw(st.text(st.sampled_from("xyz "), max_size=3)))
        line = Line("", "bad", reason="wrong number of columns")
    elif kind == "missing-column":
        del cells[draw(st.integers(0, len(cells) - 1))]
        line = Line("", "bad", reason="wrong number of columns")
    line.content = delimiter.join(cells)
    if not line.content:  # one empty cell left: the csv module sees a blank line
        line = Line("", "blank")
    return line


@st.composite
def unclosed_quote_line(draw, delimiter: str) -> Line:
    """A first cell that opens a quote and never closes it: the rest of the file is one cell."""
    body = draw(st.text(st.sampled_from(f"ab c{delimiter}\n"), max_size=10))
    return Line('"' + body, "bad", reason="wrong number of columns", swallows_rest=True)


# ---------------------------------------------------------------------- files
@dataclasses.dataclass
class DataFile:
    fmt: str
    fields: Fields
    data: bytes
    lines: list[tuple[int, Line]]  # (first physical line number, row) for data rows and blank lines
    utf8_line: int | None  # first line holding invalid UTF-8
    header_error: tuple[int, str] | None = None  # (line, column) when the header lacks a column


def _corrupt(draw, content: str) -> tuple[bytes, int]:
    """Insert invalid UTF-8 at a character boundary; return the bytes and the line offset."""
    where = draw(st.integers(0, len(content)))
    bad = draw(st.sampled_from(BAD_UTF8))
    return content[:where].encode() + bad + content[where:].encode(), content[:where].count("\n")


@st.composite
def data_files(draw, fmt: str) -> DataFile:
    f = draw(fields_st)
    delimiter = {"csv": ",", "tsv": "\t"}.get(fmt)
    chunks: list[tuple[str, Line | None]] = []  # (text without terminator, row or None for header)
    header_error = None
    columns: list[str] = []
    if fmt != "jsonl":
        for _ in range(draw(st.integers(0, 2))):
            chunks.append(("", Line("", "blank")))
        columns = draw(
            st.permutations(
                [f.text, f.second] + draw(st.lists(st.sampled_from(["id", "note"]), max_size=2, unique=True))
            )
        )
        header = list(columns)
        if draw(st.sampled_from([False] * 9 + [True])):  # a required column missing from the header
            missing = draw(st.sampled_from([f.text, f.second]))
            header = [c if c != missing else c + "_x" for c in header]
            header_error = missing
        pad = draw(st.sampled_from(["", " "]))
        chunks.append((delimiter.join(pad + c + pad for c in header), None))
    rows = draw(
        st.lists(
            jsonl_line(f) if fmt == "jsonl" else csv_line(f, columns, delimiter), min_size=1, max_size=10
        )
    )
    if fmt != "jsonl" and draw(st.sampled_from([False] * 7 + [True])):
        rows.append(draw(unclosed_quote_line(delimiter)))
    chunks += [(row.content, row) for row in rows]

    newline = draw(st.sampled_from(["\n", "\r\n"]))
    # A row that starts with U+FEFF is only malformed after the file's own byte-order mark.
    bom = draw(st.booleans()) or bool(chunks and chunks[0][0].startswith("\ufeff"))
    final_newline = draw(st.booleans())
    corrupt = (
        set(draw(st.lists(st.integers(0, max(len(chunks) - 1, 0)), max_size=2)))
        if chunks and draw(st.sampled_from([False] * 3 + [True]))
        else set()
    )

    data = b"\xef\xbb\xbf" if bom else b""
    line_no, lines, utf8_line, header_line = 1, [], None, None
    for index, (content, row) in enumerate(chunks):
        last = index == len(chunks) - 1
        ending = "" if last and not final_newline else newline
        if index in corrupt:
            raw, offset = _corrupt(draw, content)
            if utf8_line is None:
                utf8_line = line_no + offset
        else:
            raw = content.encode("utf-8")
        data += raw + ending.encode()
        if row is None:
            header_line = line_no
        else:
            lines.append((line_no, row))
        line_no += content.count("\n") + 1
    return DataFile(fmt, f, data, lines, utf8_line, (header_line, header_error) if header_error else None)


def _expected(df: DataFile, path: str, skip_invalid: bool):
    """("error", line, fragment) or ("ok", examples, reasons)."""
    if not df.data:
        return ("error", None, "is empty")
    if df.utf8_line is not None:
        return ("error", df.utf8_line, "invalid UTF-8")
    examples, reasons = [], collections.Counter()
    rows = 0
    for number, line in df.lines:
        if line.status == "blank":
            continue
        rows += 1
        if line.status == "bad":
            if not skip_invalid:
                return ("error", number, line.reason, line.field)
            reasons[line.reason] += 1
        else:
            text, second = line.value
            key = "label" if df.fields.task == "classification" else "target"
            examples.append(Example(text=text, source=f"{path}:{number}", **{key: second}))
        if line.swallows_rest:
            break
    if rows == 0:
        return ("error", None, "has no rows")
    if not examples:
        return ("error", None, "no usable rows")
    return ("ok", examples, reasons)


# What a strict read says about a row, by SkipReport reason (prefix).
_DETAIL = {
    "missing field": "missing (the row has fields",
    "wrong type for field": "must be a string",
    "empty": "is empty or only whitespace",
    "text longer": "exceeds max_chars",
    "target longer": "exceeds max_chars",
    "wrong number of columns": "columns, but the header has",
    "malformed JSON": "malformed JSON",
    "not a JSON object": "expected a JSON object",
}


def _detail(reason: str) -> str:
    return next(text for prefix, text in _DETAIL.items() if reason.startswith(prefix))


def _check(df: DataFile, skip_invalid: bool) -> None:
    suffix = {"jsonl": ".jsonl", "csv": ".csv", "tsv": ".tsv"}[df.fmt]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(df.data)
        name = str(path)
        if df.header_error is not None and df.utf8_line is None:
            expected = ("error", df.header_error[0], f"column {df.header_error[1]!r} is missing")
        else:
            expected = _expected(df, name, skip_invalid)
        try:
            examples, report = read_examples(path, skip_invalid=skip_invalid, **df.fields.options())
        except DataError as err:
            message = str(err)
            assert expected[0] == "error", f"unexpected DataError: {message}"
            event("DataError: bad row" if len(expected) == 4 else f"DataError: {expected[2]}")
            assert name in message, message
            fragment = _detail(expected[2]) if len(expected) == 4 else expected[2]
            assert fragment in message, (expected, message)
            assert err.line == expected[1], (expected, message)
            if expected[1] is not None:
                assert re.search(rf"\bline {expected[1]}\b", message), message
            if len(expected) == 4:  # a row error names the field at fault
                assert err.field == expected[3], (expected, err.field)
            return
        except Exception as err:
            raise AssertionError(f"read_examples raised {type(err).__name__}, not DataError: {err}") from err
        event("read, some rows skipped" if report.total() else "read, nothing skipped")
        assert expected[0] == "ok", f"expected an error {expected}, got {len(examples)} examples"
        assert examples == expected[1]
        assert report.total() == sum(expected[2].values())
        assert report.skipped == dict(expected[2])


@SETTINGS
@given(df=data_files("jsonl"), skip_invalid=st.booleans())
def test_fuzzed_jsonl(df, skip_invalid):
    _check(df, skip_invalid)


@SETTINGS
@given(df=data_files("csv"), skip_invalid=st.booleans())
def test_fuzzed_csv(df, skip_invalid):
    _check(df, skip_invalid)


@SETTINGS
@given(df=data_files("tsv"), skip_invalid=st.booleans())
def test_fuzzed_tsv(df, skip_invalid):
    _check(df, skip_invalid)


def test_integer_too_long_for_python_is_a_bad_row(tmp_path):
    # Regression: json.loads raises a plain ValueError (not JSONDecodeError) for an integer
    # literal past sys.get_int_max_str_digits(); it escaped read_examples uncaught.
    path = tmp_path / "big.jsonl"
    path.write_text('{"text": "good", "label": "positive"}\n{"text": "a", "label": ' + "9" * 5000 + "}\n")
    examples, report = read_examples(path, skip_invalid=True)
    assert [e.text for e in examples] == ["good"] and report.skipped == {"malformed JSON": 1}
    with pytest.raises(DataError, match="line 2: malformed JSON") as info:
        read_examples(path)
    assert info.value.line == 2
