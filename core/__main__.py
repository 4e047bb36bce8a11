"""``python -m modelpress``: the same as the ``modelpress`` command, from a given interpreter."""

import sys

from modelpress.cli import main

sys.exit(main())
