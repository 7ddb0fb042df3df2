"""Shared fixtures: make `tests/` importable for helpers like tiny_models; the tiny chat model most CLI tests use.

Modules that need a different tiny model (byte-level tokenizer, a model card) define their own `tiny_chat`,
which overrides this one for that module.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build, save_tokenizer


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with tied embeddings and a chat tokenizer, saved to a folder."""
    folder = tmp_path_factory.mktemp("tiny") / "llama-chat"
    build("llama", folder, tied=True)
    save_tokenizer(folder)
    return folder
