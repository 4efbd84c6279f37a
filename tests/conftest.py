"""Shared fixtures."""

import os
from pathlib import Path

import pytest


@pytest.fixture
def reference_data() -> Path:
    """The read-only reference data folder (../shared/data in CI), from ICOT_REFERENCE_DATA."""
    folder = os.environ.get("ICOT_REFERENCE_DATA")
    if not folder:
        pytest.skip("ICOT_REFERENCE_DATA is not set: point it at the shared reference data folder")
    path = Path(folder)
    if not path.is_dir():
        # Set but wrong is a broken setup, not a reason to skip quietly.
        pytest.fail(f"ICOT_REFERENCE_DATA={folder} is not a folder")
    return path


@pytest.fixture(scope="module")
def tokenizers():
    """The three test tokenizers (byte-level BPE, word-level, sentencepiece) built on sample lines."""
    from tests.tokenizer_fixtures import SAMPLE_LINES, TOKENIZER_KINDS, build, line_segments

    return {kind: build(kind, line_segments(SAMPLE_LINES)) for kind in TOKENIZER_KINDS}
