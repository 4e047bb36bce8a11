"""modelpress: plugin-based, framework-agnostic model compression, verified on ONNX Runtime.

The public API is what ``__all__`` lists; everything else is private to the package.
"""

from __future__ import annotations

from importlib import metadata as _metadata

# NOTE: first, before any module imports onnx_ir: sympy stays unimported (~40 MB of RSS)
from modelpress.base import _deferred  # noqa: F401  (imports onnx_ir with sympy deferred)

try:
    __version__ = _metadata.version("modelpress")
except _metadata.PackageNotFoundError:  # pragma: no cover - running from a bare source tree
    __version__ = "0.0.0+unknown"

from modelpress.app.compress import CompressResult, StageMetrics, compress
from modelpress.app.convert import ConvertResult, convert
from modelpress.app.describe import describe
from modelpress.app.pipeline import apply, distill, prune, quantize
from modelpress.app.recipe import Recipe, load_recipe
from modelpress.app.tuning import BatchResult, TuneResult, compress_batch, tune
from modelpress.base.errors import (
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

__all__ = [
    "KINDS",
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
