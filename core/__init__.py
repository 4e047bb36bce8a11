"""modelpress: plugin-based, framework-agnostic model compression, verified on ONNX Runtime.

The public API is what ``__all__`` lists; everything else is private to the package. The names are
imported on first use (PEP 562): ``import modelpress`` (and so ``modelpress --help``) imports no
onnx, numpy, pydantic or rich; ``from modelpress import load`` imports what ``load`` needs.
"""

from __future__ import annotations

import importlib
import sys
import types
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

from modelpress.base.deferred import defer_symbolic_imports

defer_symbolic_imports()  # NOTE: before anything imports onnx-ir: sympy is imported on first use

try:
    __version__ = _metadata.version("modelpress")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"

if (
    TYPE_CHECKING
):  # NOTE: what type checkers and IDEs see; at run time __getattr__ imports each on first use
    from modelpress.app.compress import CompressResult, StageMetrics, compress
    from modelpress.app.convert import ConvertResult, convert
    from modelpress.app.describe import describe
    from modelpress.app.pipeline import apply, distill, prune, quantize
    from modelpress.app.recipe import Recipe, load_recipe
    from modelpress.app.tuning import BatchResult, TuneResult, compress_batch, tune
    from modelpress.base.errors import (
        AccuracyLossError,
        DataError,
        DuplicateMethodError,
        ExportError,
        InvalidModelError,
        ModelpressError,
        NoGainError,
        OptionsError,
        PluginError,
        PluginWarning,
        UnknownMethodError,
        UnsafeExternalDataError,
        UnsupportedModelError,
        VerificationError,
    )
    from modelpress.data.samples import Dataset, load_dataset, sample_inputs
    from modelpress.evaluation.comparison import Comparison
    from modelpress.io.export import ExportResult, export, verify
    from modelpress.io.framework_bridge import fit, to_torch, update_weights
    from modelpress.ir.layers import WeightedLayer
    from modelpress.ir.model import Model
    from modelpress.ir.provenance import PassRecord, Provenance
    from modelpress.ir.signature import Signature, TensorSpec
    from modelpress.packing.container import PackResult, pack, unpack
    from modelpress.plugin.adapter import Adapter
    from modelpress.plugin.codec import Codec, TensorInfo
    from modelpress.plugin.hookspecs import hookimpl
    from modelpress.plugin.loading import load
    from modelpress.plugin.methods import KINDS, Kind, Method, Options, PassContext
    from modelpress.plugin.registry import Registry, create_registry, get_registry, reset_registry

# NOTE: each public name and the module that defines it
_API: dict[str, str] = {
    "CompressResult": "modelpress.app.compress",
    "StageMetrics": "modelpress.app.compress",
    "compress": "modelpress.app.compress",
    "ConvertResult": "modelpress.app.convert",
    "convert": "modelpress.app.convert",
    "describe": "modelpress.app.describe",
    "apply": "modelpress.app.pipeline",
    "distill": "modelpress.app.pipeline",
    "prune": "modelpress.app.pipeline",
    "quantize": "modelpress.app.pipeline",
    "Recipe": "modelpress.app.recipe",
    "load_recipe": "modelpress.app.recipe",
    "BatchResult": "modelpress.app.tuning",
    "TuneResult": "modelpress.app.tuning",
    "compress_batch": "modelpress.app.tuning",
    "tune": "modelpress.app.tuning",
    "AccuracyLossError": "modelpress.base.errors",
    "DataError": "modelpress.base.errors",
    "DuplicateMethodError": "modelpress.base.errors",
    "ExportError": "modelpress.base.errors",
    "InvalidModelError": "modelpress.base.errors",
    "ModelpressError": "modelpress.base.errors",
    "NoGainError": "modelpress.base.errors",
    "OptionsError": "modelpress.base.errors",
    "PluginError": "modelpress.base.errors",
    "PluginWarning": "modelpress.base.errors",
    "UnknownMethodError": "modelpress.base.errors",
    "UnsafeExternalDataError": "modelpress.base.errors",
    "UnsupportedModelError": "modelpress.base.errors",
    "VerificationError": "modelpress.base.errors",
    "Dataset": "modelpress.data.samples",
    "load_dataset": "modelpress.data.samples",
    "sample_inputs": "modelpress.data.samples",
    "Comparison": "modelpress.evaluation.comparison",
    "ExportResult": "modelpress.io.export",
    "export": "modelpress.io.export",
    "verify": "modelpress.io.export",
    "fit": "modelpress.io.framework_bridge",
    "to_torch": "modelpress.io.framework_bridge",
    "update_weights": "modelpress.io.framework_bridge",
    "WeightedLayer": "modelpress.ir.layers",
    "Model": "modelpress.ir.model",
    "PassRecord": "modelpress.ir.provenance",
    "Provenance": "modelpress.ir.provenance",
    "Signature": "modelpress.ir.signature",
    "TensorSpec": "modelpress.ir.signature",
    "PackResult": "modelpress.packing.container",
    "pack": "modelpress.packing.container",
    "unpack": "modelpress.packing.reader",
    "Adapter": "modelpress.plugin.adapter",
    "Codec": "modelpress.plugin.codec",
    "TensorInfo": "modelpress.plugin.codec",
    "hookimpl": "modelpress.plugin.hookspecs",
    "load": "modelpress.plugin.loading",
    "KINDS": "modelpress.plugin.methods",
    "Kind": "modelpress.plugin.methods",
    "Method": "modelpress.plugin.methods",
    "Options": "modelpress.plugin.methods",
    "PassContext": "modelpress.plugin.methods",
    "Registry": "modelpress.plugin.registry",
    "create_registry": "modelpress.plugin.registry",
    "get_registry": "modelpress.plugin.registry",
    "reset_registry": "modelpress.plugin.registry",
}


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'modelpress' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # NOTE: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(types.ModuleType):
    """``modelpress.pack`` is the function, as with eager imports, although importing the subpackage
    ``modelpress.pack`` sets that attribute to the subpackage (the import system does that)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and name in _API:
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "KINDS",
    "AccuracyLossError",
    "Adapter",
    "BatchResult",
    "Codec",
    "Comparison",
    "CompressResult",
    "ConvertResult",
    "DataError",
    "Dataset",
    "DuplicateMethodError",
    "ExportError",
    "ExportResult",
    "InvalidModelError",
    "Kind",
    "Method",
    "Model",
    "ModelpressError",
    "NoGainError",
    "Options",
    "OptionsError",
    "PackResult",
    "PassContext",
    "PassRecord",
    "PluginError",
    "PluginWarning",
    "Provenance",
    "Recipe",
    "Registry",
    "Signature",
    "StageMetrics",
    "TensorInfo",
    "TensorSpec",
    "TuneResult",
    "UnknownMethodError",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "VerificationError",
    "WeightedLayer",
    "__version__",
    "apply",
    "compress",
    "compress_batch",
    "convert",
    "create_registry",
    "describe",
    "distill",
    "export",
    "fit",
    "get_registry",
    "hookimpl",
    "load",
    "load_dataset",
    "load_recipe",
    "pack",
    "prune",
    "quantize",
    "reset_registry",
    "sample_inputs",
    "to_torch",
    "tune",
    "unpack",
    "update_weights",
    "verify",
]
