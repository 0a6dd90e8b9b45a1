"""The routes, one module per endpoint group; each lists its own in `ROUTES` (method, path,
handler) and finds the `Server` on `app.state`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import Request

from softprompt.serve.routes import adapters, classify, generation, models

ROUTES: list[tuple[str, str, Callable[[Request], Any]]] = [
    *models.ROUTES,
    *generation.ROUTES,
    *classify.ROUTES,
    *adapters.ROUTES,
]
"""Every route of the server."""
