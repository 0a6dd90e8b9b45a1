"""MkDocs hooks: the home page is the README and the changes page is CHANGELOG.md.

Both files live at the top of the repository, where GitHub shows them; the site takes them
from there instead of keeping copies. The README's links point into docs/ (so they work
on GitHub); on the site they are rewritten to the pages they name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"index.md": "README.md", "changelog.md": "CHANGELOG.md"}


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    source = SOURCES.get(page.file.src_uri)
    if source is None:
        return markdown
    text = (ROOT / source).read_text(encoding="utf-8")
    text = re.sub(r"\]\(docs/", "](", text)
    return text.replace("](CHANGELOG.md)", "](changelog.md)")
