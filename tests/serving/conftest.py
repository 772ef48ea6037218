"""Fixtures of the serving tests (helpers in ``helpers.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from .helpers import TINY_1B


@pytest.fixture(scope="session")
def tiny_1b() -> Path:
    if not (TINY_1B / "config.json").is_file():
        pytest.fail(f"tiny checkpoint missing: {TINY_1B} (tests/fixtures, committed with the repository)")
    return TINY_1B
