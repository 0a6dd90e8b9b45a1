"""Tiny models and a tokenizer built on the spot: no network, no hub."""

from __future__ import annotations

import logging
import os
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
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


__all__ = ["WORDS", "build_model"]
