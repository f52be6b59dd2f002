"""``python -m patchcore.cli``: the same as the ``patchcore`` command."""

import sys

from . import main

sys.exit(main())
