"""`softprompt serve`: an OpenAI-compatible server for one frozen model and many soft prompts.

Three parts: `app` (HTTP routes, schemas, error envelope), `scheduler` (bounded queue,
admission, cancellation) and `engine` (the model thread: prefill through each adapter's
cached prompt KV, batched decode steps for all running requests). Needs the `serve`
extra (`pip install 'softprompt[serve]'`); importing `softprompt` does not.
"""

from __future__ import annotations

from typing import Any


def create_app(*args: Any, **kwargs: Any) -> Any:
    """See `softprompt.serve.app.create_app`."""
    # (FastAPI is the serve extra's: the package's other modules, e.g. for vLLM, work without it)
    from softprompt.serve.app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["create_app"]
