"""``python -m internvl_runtime ...`` is the ``internvl`` command."""

import sys

from .cli import main

sys.exit(main())
