"""The module names of softprompt 0.1 still import (softprompt._moved) until 0.3."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from softprompt._moved import MOVED

_CHECK = """
import importlib, sys, warnings
old, new = sys.argv[1], sys.argv[2]
warnings.simplefilter('error', DeprecationWarning)
real = importlib.import_module(new)
try:
    importlib.import_module(old)
except DeprecationWarning as w:
    print('WARNED', old, '|', w)
sys.modules.pop(old, None)
warnings.simplefilter('ignore', DeprecationWarning)
alias = importlib.import_module(old)
print('SAME', old, alias is real, real.__spec__.name)
"""


def test_every_old_name_gives_the_module_it_became_and_says_where():
    """In a fresh interpreter (no old name imported yet): each old name gives the same module
    object, with a DeprecationWarning naming the new place, and the module keeps its own spec."""
    script = "\n".join(
        f"sys.argv[1:] = [{old!r}, {new!r}]\nexec(compile(CHECK, 'check', 'exec'), {{}})"
        for old, new in sorted(MOVED.items())
    )
    code = f"import sys\nCHECK = {_CHECK!r}\n{script}\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for old, new in MOVED.items():
        assert f"WARNED {old} | {old} is now {new}" in result.stdout, old
        assert f"SAME {old} True {new}" in result.stdout, old


def test_every_new_place_exists():
    for new in set(MOVED.values()):
        assert importlib.util.find_spec(new) is not None, new
