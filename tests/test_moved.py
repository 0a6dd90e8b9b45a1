"""The module names of softprompt 0.1 still import (softprompt._moved) until 0.3."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from softprompt._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_name_gives_the_module_it_became_and_says_where(old):
    """In a fresh interpreter (the old name not imported yet): the same module object, a
    DeprecationWarning naming the new place, and the module keeps its own spec."""
    new = MOVED[old]
    code = (
        "import importlib, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        f"real = importlib.import_module({new!r})\n"
        "try:\n"
        f"    importlib.import_module({old!r})\n"
        "except DeprecationWarning as w:\n"
        "    print('WARNED', w)\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        f"alias = importlib.import_module({old!r})\n"
        "print('SAME', alias is real, real.__spec__.name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert f"WARNED {old} is now {new}" in out
    assert f"SAME True {new}" in out


def test_every_new_place_exists():
    for new in set(MOVED.values()):
        assert importlib.util.find_spec(new) is not None, new
