"""Where the tests' data lives, named once: every test module reads ``FIXTURES`` from here.

``tests/fixtures/`` holds the golden data, committed with the repository so that a clone alone runs the
suite: seven tiny random-weight checkpoints in the official layout, the cases, the input images and video,
and the official implementation's answers (see ``tests/fixtures/README.md``).

Test modules write ``from paths import FIXTURES``: pytest (default ``prepend`` import mode) puts ``tests/``
on ``sys.path`` when it loads ``tests/conftest.py``, before any test module.
"""

from __future__ import annotations

from pathlib import Path

#: The golden data folder, ``<repo>/tests/fixtures``.
FIXTURES = Path(__file__).resolve().parent / "fixtures"
