"""Shared test set-up: ``tests/`` on sys.path (for ``zoo``), and the real data in ``../shared/data``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

# CI clones the repository next to ``shared/``; TICO_SHARED_DATA points elsewhere if needed.
SHARED_DATA = Path(os.environ.get("TICO_SHARED_DATA", TESTS.parent.parent / "shared" / "data"))
STORIES_HF = SHARED_DATA / "stories260K-hf"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"
TINYSTORIES = SHARED_DATA / "tinystories" / "validation_head.txt"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the ../shared/data folder beside the repository is absent)")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The real pretrained tiny Llama ``stories260K-hf`` (skips when ../shared is absent)."""
    return _require(STORIES_HF)


@pytest.fixture(scope="session")
def wikitext_valid() -> Path:
    return _require(WIKITEXT_VALID)


@pytest.fixture(scope="session")
def tinystories_text() -> Path:
    return _require(TINYSTORIES)
