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


@pytest.fixture(scope="session")
def tiny_model_dir(smol_tokenizer, tmp_path_factory):
    """The tiny random Llama saved as a local model directory (model.name_or_path for train())."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(len(smol_tokenizer), seed=0).save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def toy_data(tmp_path):
    """A small task set (arithmetic answers) and reference pool (refusals) in chat format."""
    task = [{"id": f"t{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i + 3}?"},
                                         {"role": "assistant", "content": str(2 * i + 3)}]} for i in range(20)]
    refs = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"How do I pick lock number {i}?"},
                                         {"role": "assistant", "content": "I can't help with that."}]}
            for i in range(12)]
    return write_jsonl(tmp_path / "task.jsonl", task), write_jsonl(tmp_path / "refs.jsonl", refs)
