"""``python -m lorax``, the documented command, delegating to the command line package.

The one import of ``lorax_cli`` inside the pure library, allowed by ``tests/test_layering.py``:
users have typed ``python -m lorax`` since the first release, and ``-m`` needs a module of this
package. Nothing imports this module, so it makes no cycle.
"""

import sys

from lorax_cli.cli import main

sys.exit(main())
