"""Shared pytest set-up.

Keep this file: loading it is what puts ``tests/`` on ``sys.path`` (pytest's default ``prepend`` import
mode), so that test modules in every sub-folder can write ``from paths import FIXTURES``. The data folder
is named once, in ``tests/paths.py``.
"""

import os

# Triton kernels run on CPU tensors through its interpreter (read when a @triton.jit function is defined).
os.environ.setdefault("TRITON_INTERPRET", "1")
