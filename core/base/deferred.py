"""Imports deferred to first use: sympy, which onnx-ir imports eagerly for symbolic shapes only.

onnx-ir 1.x's ``_core`` does ``import sympy`` at import time, and its ``_symbolic_shapes`` builds a
table of sympy functions at import time, although sympy is used only for arithmetic on symbolic
dimensions (``SymbolicDim("n") + 1``) that modelpress never does on its own paths. sympy and mpmath
are about 34 MB of resident memory and 420 modules: a third of what a quantization of a small
model holds at its peak.

:func:`defer_symbolic_imports` (called once, by ``modelpress/__init__.py``, before anything imports
onnx-ir) installs a finder that hands the import system those two modules with the standard
library's :class:`importlib.util.LazyLoader`: the module objects exist, and the first attribute
read on one (``sympy.Expr``, ``_symbolic_shapes.parse_symbolic_expression``) runs the real
import. Through the import system (a finder, not a module pushed into ``sys.modules`` by hand) the
parent package's attribute and the import locks are set as for any import. A later ``import
sympy`` statement elsewhere (torch's symbolic shapes) reads the module's ``__spec__``, which
runs the real import there: the deferral ends where sympy is wanted.

It does nothing when sympy or onnx-ir is already imported (the process already paid), or when
either is not installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

# NOTE: the module names deferred; sympy's own submodules are imported when sympy really loads
DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class _DeferringFinder(importlib.abc.MetaPathFinder):
    """Finds each of ``names`` once, through the path finder, and wraps its loader in
    :class:`importlib.util.LazyLoader`; removes itself from ``sys.meta_path`` when all are found."""

    def __init__(self, names: Sequence[str]) -> None:
        self.pending = set(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.pending:
            return None
        self.pending.discard(fullname)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def defer_symbolic_imports() -> bool:
    """Defer sympy (and onnx-ir's module that reads it at import time) to first use; returns
    whether the finder was installed (False: already imported, not installed, or installed)."""
    if any(name.split(".")[0] in sys.modules for name in DEFERRED):
        return False
    if any(isinstance(f, _DeferringFinder) for f in sys.meta_path):
        return False
    if importlib.util.find_spec("sympy") is None or importlib.util.find_spec("onnx_ir") is None:
        return False
    sys.meta_path.insert(0, _DeferringFinder(DEFERRED))
    return True
