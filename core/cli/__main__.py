"""``python -m modelpress.cli``: the same as the ``modelpress`` command."""

import sys

from modelpress.cli import main

sys.exit(main())
