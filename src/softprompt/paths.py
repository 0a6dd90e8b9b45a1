"""Where softprompt keeps converted models and downloaded data."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(sub: str | None = None) -> Path:
    """`$SOFTPROMPT_CACHE`, else `~/.cache/softprompt` (or `$XDG_CACHE_HOME/softprompt`).

    Args:
        sub: Optional subfolder ("models", "data").
    """
    root = os.environ.get("SOFTPROMPT_CACHE")
    if root:
        base = Path(root).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "softprompt"
    return base / sub if sub else base
