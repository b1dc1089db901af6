"""Fixtures every test folder shares: tiny random Hugging Face data2vec folders, as a user downloads them.

``published(modality, folder, **config_overrides)`` writes a folder that transformers' ``from_pretrained``
loads: ``config.json`` + ``model.safetensors`` of a random ``Data2Vec{Audio,Vision,Text}Model`` at toy width
and its processor files (``preprocessor_config.json``, the RoBERTa tokenizer files, ``<mask>`` last as in
RoBERTa's). The one definition is ``benchmarks/published.py``'s ``write_published``, which also runs them
through the pipeline.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_SPEC = importlib.util.spec_from_file_location(
    "d2v_benchmarks_published", Path(__file__).resolve().parents[1] / "benchmarks" / "published.py"
)
_published = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(_published)
write_published = _published.write_published


@pytest.fixture
def published():
    """``write_published`` (see the module docstring)."""
    return write_published
