"""``python -m lorax_cli``: the same command line as ``python -m lorax``."""

import sys

from .cli import main

sys.exit(main())
