"""The ``modelpress`` command line (the ``modelpress`` console script, ``python -m modelpress``).

One module per command group (:mod:`~modelpress.cli.methods`: apply/quantize/prune/distill;
:mod:`~modelpress.cli.inspect`, :mod:`~modelpress.cli.pack`, :mod:`~modelpress.cli.convert`,
:mod:`~modelpress.cli.compress`, :mod:`~modelpress.cli.tune`, :mod:`~modelpress.cli.plugins`),
one option parser (:mod:`~modelpress.cli.options`), and :mod:`~modelpress.cli.main`: the parser,
the dispatch and the exit codes (see its docstring).
"""

from __future__ import annotations

from modelpress.cli.common import (
    EXIT_CRITERIA,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
)
from modelpress.cli.main import EXIT_BY_ERROR, build_parser, main

__all__ = [
    "EXIT_BY_ERROR",
    "EXIT_CRITERIA",
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]
