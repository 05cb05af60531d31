"""Shared test fixtures. Tests never reach the Hugging Face Hub: offline mode is set before any
test module imports `datasets` or `transformers` (they read it at import time)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def chat_tokenizer(tmp_path_factory):
    """The bundled character-level fast tokenizer (chat template writes BOS; `<s>` `</s>` `<pad>`)."""
    from simpo_ray.bundled.tokenizer import build_tokenizer

    return build_tokenizer(tmp_path_factory.mktemp("chat_tokenizer"))
