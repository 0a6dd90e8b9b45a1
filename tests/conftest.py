"""Tiny models and a tokenizer built on the spot: no network, no hub."""

from __future__ import annotations

import logging
import os
import shutil
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*bos_token_id must be.*")
logging.getLogger("transformers").setLevel(logging.ERROR)

from hypothesis import settings

from tests.tiny import WORDS, build_model, make_tokenizer

# Property tests draw the same examples on every run, so CI never fails by chance;
# HYPOTHESIS_PROFILE=explore draws new ones (run it when changing a parser or a strategy).
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def softprompt_cache(tmp_path_factory):
    """One temporary `$SOFTPROMPT_CACHE` for the whole session: slow tests convert the default
    model and parse the built-in data there, never in the user's cache. The vaderSentiment
    sdist is copied from the user's cache when it is there (no network; the loader checks
    its SHA-256), else downloaded with pip as on first use."""
    from softprompt import paths
    from softprompt.data.builtin import SDIST_NAME

    user_sdist = paths.cache_dir("data") / "downloads" / SDIST_NAME  # before the override
    root = tmp_path_factory.mktemp("softprompt-cache")
    if user_sdist.is_file():
        (root / "data" / "downloads").mkdir(parents=True)
        shutil.copyfile(user_sdist, root / "data" / "downloads" / SDIST_NAME)
    patch = pytest.MonkeyPatch()
    patch.setenv("SOFTPROMPT_CACHE", str(root))
    yield root
    patch.undo()


def pytest_collection_modifyitems(items):
    # Every slow test runs inside the session's temporary cache, set up before its other
    # fixtures (module-scoped model loaders included).
    for item in items:
        if item.get_closest_marker("slow") and "softprompt_cache" not in item.fixturenames:
            item.fixturenames.insert(0, "softprompt_cache")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


__all__ = ["WORDS", "build_model"]


@pytest.fixture(scope="session")
def sharded_ws(tmp_path_factory):
    """The tiny model and data of tests/test_distributed.py, shared by the FSDP and ZeRO-3 tests."""
    from tests.test_distributed import SPLITS
    from tests.tiny import review_workspace

    return review_workspace(tmp_path_factory.mktemp("sharded"), SPLITS)


@pytest.fixture(scope="session")
def sharded_reference(sharded_ws):
    """One process, float32, grad_accum 2: the global batch of the 2-process FSDP and ZeRO-3
    runs (trained once for both test modules)."""
    from tests.sharded_support import FLOAT32_15_BATCHES
    from tests.test_distributed import _one, _run

    out = sharded_ws / "reference-1-process"
    _run(_one(sharded_ws, out, "--grad-accum", "2", *FLOAT32_15_BATCHES))
    return out
