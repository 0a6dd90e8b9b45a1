"""The documentation's Python blocks run as written: README.md and every page under docs/.

Each page's ```python blocks run in order in one namespace, in a fresh working folder, with
the packaged default model (hence `slow`). A block right after `<!-- docs-test: server -->`
talks to a real `softprompt serve` (a tiny model whose adapters include `sst`, on a free
port that replaces the block's 127.0.0.1:8000). A block that cannot run here says why in
`<!-- docs-test: skip: REASON -->`. `make docs` checks the pages' links and API references.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"^\s*<!-- docs-test: (?P<what>server|skip: (?P<why>.+?)) -->\s*$")
DOCUMENTED_PORT = "http://127.0.0.1:8000"


@dataclass
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    code: str
    marker: str | None  # "server", "skip" or None
    why: str | None = None


def python_blocks(page: Path) -> list[Block]:
    """The ```python blocks of `page` (dedented), with the marker on the line before each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, end = opening["indent"], i + 1
        while end < len(lines) and not re.match(rf"^{indent}```\s*$", lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page.name}:{i + 1}: a code block that is never closed")
        if opening["lang"] == "python":
            previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.match(previous)
            code = textwrap.dedent("\n".join(lines[i + 1 : end]))
            kind = None if marker is None else ("skip" if marker["why"] else "server")
            blocks.append(Block(page, i + 1, code, kind, marker and marker["why"]))
        i = end + 1
    return blocks


RUNNABLE = [p for p in PAGES if any(b.marker != "skip" for b in python_blocks(p))]


def test_the_guides_have_code_that_runs():
    """The pages this test runs (a renamed or emptied page would otherwise drop out silently)."""
    names = {str(p.relative_to(ROOT)) for p in RUNNABLE}
    assert {
        "README.md",
        "docs/guides/training.md",
        "docs/guides/data.md",
        "docs/guides/composing.md",
        "docs/guides/serving.md",
        "docs/guides/serving-vllm.md",
        "docs/guides/peft-interop.md",
    } <= names, names
    skipped = [b for p in PAGES for b in python_blocks(p) if b.marker == "skip"]
    assert all(b.why and b.why.strip() for b in skipped)


def test_the_block_reader_sees_fences_markers_and_indented_blocks(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "text\n\n```python\na = 1\n```\n\n<!-- docs-test: server -->\n```python\nb = 2\n```\n"
        "- item\n\n  ```python\n  c = 3\n  ```\n\n<!-- docs-test: skip: needs a GPU -->\n"
        "```python\nd = 4\n```\n```bash\necho no\n```\n",
        encoding="utf-8",
    )
    got = [(b.line, b.code, b.marker, b.why) for b in python_blocks(page)]
    assert got == [
        (3, "a = 1", None, None),
        (8, "b = 2", "server", None),
        (13, "c = 3", None, None),
        (18, "d = 4", "skip", "needs a GPU"),
    ]


@pytest.fixture(scope="module")
def docs_server(tmp_path_factory):
    """A real `softprompt serve` over a tiny model whose adapters include `sst`, for the blocks
    marked `server`; started on first use only."""
    from tests.test_serve_support import ServerProcess, build_served_folder

    servers = []

    def start() -> str:
        if not servers:
            root = tmp_path_factory.mktemp("docs-server")
            model_dir, adapters_dir = build_served_folder(root)
            server = ServerProcess(["--model", str(model_dir), "--adapters", str(adapters_dir)], root / "log")
            servers.append(server)
            server.wait_ready(timeout=120)
        return servers[0].url

    yield start
    for server in servers:
        server.stop()


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=lambda p: str(p.relative_to(ROOT)))
def test_the_page_runs_as_written(page, tmp_path, monkeypatch, docs_server):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for block in python_blocks(page):
        if block.marker == "skip":
            continue
        code = block.code
        if block.marker == "server":
            assert DOCUMENTED_PORT in code, f"{page.name}:{block.line}: a server block names no server"
            code = code.replace(DOCUMENTED_PORT, docs_server())
        try:
            exec(compile(code, f"{page.name}:{block.line}", "exec"), namespace)  # noqa: S102  (our own pages)
        except Exception as err:
            raise AssertionError(
                f"{page.relative_to(ROOT)}, the block at line {block.line}: {err!r}"
            ) from err
