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


@pytest.fixture
def restored_logging():
    """For a test that runs ``internvl serve`` in this process: the logging configuration it applies
    (``dictConfig``: handlers on the captured stderr, levels) is undone afterwards, so later tests' log records
    do not go to a stream pytest has closed."""
    import logging

    names = ["", *[name for name in logging.root.manager.loggerDict if name.split(".")[0] in ("internvl_runtime",
                                                                                                 "uvicorn")]]
    saved = {name: (logging.getLogger(name).level, list(logging.getLogger(name).handlers),
                    logging.getLogger(name).propagate, logging.getLogger(name).disabled) for name in names}
    yield
    for name in ["", *logging.root.manager.loggerDict]:
        logger = logging.getLogger(name)
        if name in saved:
            logger.level, logger.handlers[:], logger.propagate, logger.disabled = saved[name]
        elif name.split(".")[0] in ("internvl_runtime", "uvicorn"):
            logger.setLevel(logging.NOTSET)
            logger.handlers.clear()
            logger.propagate, logger.disabled = True, False
