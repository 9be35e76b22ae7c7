"""Shared fixtures. Unit tests use a tiny random Llama with the SmolLM2 tokenizer (no download);
integration tests use the real embedded SmolLM2. ../shared (data, parity fixture) is optional:
tests that need it skip when it is absent."""

import os
from pathlib import Path

import pytest

from dualselect.models import DEFAULT_MODEL, load_tokenizer, tiny_llama

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DUALSELECT_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def smol_tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture()
def tiny_model(smol_tokenizer):
    return tiny_llama(len(smol_tokenizer), seed=0)


@pytest.fixture(scope="session")
def data_dir():
    d = SHARED / "data"
    if not d.is_dir():
        pytest.skip(f"shared data directory {d} not present")
    return d


@pytest.fixture(scope="session")
def parity_dir():
    d = SHARED / "parity" / "authors-release"
    if not d.is_dir():
        pytest.skip(f"parity fixture {d} not present")
    return d
