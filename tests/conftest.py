"""Shared pytest set-up.

Keep this file: loading it is what puts ``tests/`` on ``sys.path`` (pytest's default ``prepend`` import
mode), so that test modules in every sub-folder can write ``from paths import FIXTURES``. The data folder
is named once, in ``tests/paths.py``.
"""

import os

# The Triton kernels (kernels/triton_*.py) run on CPU tensors under Triton's interpreter in the tests; the
# variable is read when a kernel is defined (its module imported), so it is set before any test imports one.
os.environ.setdefault("TRITON_INTERPRET", "1")
