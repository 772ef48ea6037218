"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

#: The repository root (this file is ``<root>/tests/conftest.py``).
REPO_ROOT = Path(__file__).resolve().parents[1]
#: The shared data folder: ``../shared`` beside the repository (CI checks it out there); the same path as
#: ``Path(__file__).resolve().parents[2].parent / "shared"`` computed from a test in ``tests/<dir>/``.
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """``../shared`` beside the repository, holding ``fixtures/`` (golden data); fails if it is missing."""
    if not (SHARED_DIR / "fixtures").is_dir():
        pytest.fail(f"shared data folder not found: expected {SHARED_DIR / 'fixtures'} (../shared beside the repo)")
    return SHARED_DIR
