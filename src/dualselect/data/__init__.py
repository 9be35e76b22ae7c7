"""Data: loading examples (files, named datasets, the hub) and turning them into tokens."""

from .formatting import (IGNORE_INDEX, MASKS, TEMPLATES, Encoded, collate, encode, encode_all,
                         generation_prompt, plain_prompt_text)
from .named import DATA_DIR_ENV, NAMED_DATASETS, load_named
from .records import FORMATS, Example, LoadReport, load_examples

__all__ = [
    "DATA_DIR_ENV", "FORMATS", "IGNORE_INDEX", "MASKS", "NAMED_DATASETS", "TEMPLATES", "Encoded", "Example",
    "LoadReport", "collate", "encode", "encode_all", "generation_prompt", "load_examples", "load_named",
    "plain_prompt_text",
]
