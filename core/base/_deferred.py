"""Defer sympy: onnx-ir (>= 1.0) imports it at module level, for symbolic-dimension arithmetic
(``SymbolicDim + 1``, ``Shape.simplify()``) that modelpress never does.

sympy costs ~40 MB of resident memory and ~0.3 s on every ``import modelpress`` (a third of the
process's baseline, and what put int8-static's peak RSS above ONNX Runtime's own tool on small
models). :func:`import_onnx_ir` imports onnx-ir with stand-ins for ``sympy`` and
``onnx_ir._symbolic_shapes`` that are put in ``sys.modules`` only for the duration of that import,
so the rest of the process (torch, a user's own ``import sympy``) gets the real modules untouched.
onnx-ir keeps the stand-ins as its globals; the first attribute it reads from one imports the real
module and forwards to it, so symbolic arithmetic still works, one import later.

Nothing happens if onnx-ir or sympy is already imported (their modules are used as they are).
Importing this module imports nothing heavy: it puts a one-shot finder first on ``sys.meta_path``
that does the above when something (a modelpress module, the user) first imports onnx-ir;
``modelpress/__init__`` imports it first, so ``import modelpress`` stays cheap (its API is lazy).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any

__all__ = ["import_onnx_ir", "install"]

_DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")


class _Deferred(types.ModuleType):
    """A module stand-in: the first attribute read imports the real module and forwards to it."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.__spec__ = None  # NOTE: read by the import system; must not trigger the import
        self.__modelpress_real__: types.ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        real = self.__modelpress_real__
        if real is None:
            if sys.modules.get(self.__name__) is self:  # pragma: no cover - only during onnx-ir's own import
                del sys.modules[self.__name__]
            real = importlib.import_module(self.__name__)
            self.__modelpress_real__ = real
        return getattr(real, attr)


def import_onnx_ir() -> None:
    """Import onnx-ir with sympy (and its sympy-using submodule) deferred; see the module docstring."""
    if "onnx_ir" in sys.modules or "sympy" in sys.modules:
        return
    stand_ins = {name: _Deferred(name) for name in _DEFERRED}
    sys.modules.update(stand_ins)
    try:
        import onnx_ir  # noqa: F401
    finally:
        for name, module in stand_ins.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]


class _OnFirstImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``onnx_ir`` once: imports it through :func:`import_onnx_ir` and hands that module over."""

    spec: importlib.machinery.ModuleSpec | None = None

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "onnx_ir":
            return None
        _uninstall()
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        import_onnx_ir()  # NOTE: the nested import goes through the ordinary finders (this one is gone)
        module = importlib.import_module("onnx_ir")  # NOTE: imported just now, or (sympy was imported before) the ordinary way
        self.spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self.spec  # NOTE: the import system set this finder's spec on the module; the real one back


_FINDER = _OnFirstImport()


def _uninstall() -> None:
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install() -> None:
    """Defer sympy in the first import of onnx-ir (now, if it is not imported yet, nothing happens now)."""
    if "onnx_ir" not in sys.modules and "sympy" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


install()
