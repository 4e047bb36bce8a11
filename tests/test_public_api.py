import subprocess
import sys

import modelpress

# The public surface is deliberate: changing it is an API change, so it is pinned here.
PUBLIC = {
    "KINDS",
    "Kind",
    "Adapter",
    "Comparison",
    "DataError",
    "Dataset",
    "DuplicateMethodError",
    "ExportError",
    "ExportResult",
    "InvalidModelError",
    "Method",
    "Model",
    "ModelpressError",
    "Options",
    "OptionsError",
    "PassContext",
    "PassRecord",
    "PluginError",
    "PluginWarning",
    "Provenance",
    "Registry",
    "Signature",
    "TensorSpec",
    "UnknownMethodError",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "VerificationError",
    "AccuracyLossError",
    "WeightedLayer",
    "__version__",
    "apply",
    "create_registry",
    "describe",
    "export",
    "get_registry",
    "hookimpl",
    "load",
    "load_dataset",
    "reset_registry",
    "sample_inputs",
    "verify",
    "ConvertResult",
    "convert",
    "fit",
    "to_torch",
    "update_weights",
    "quantize",
    "prune",
    "distill",
    "CompressResult",
    "StageMetrics",
    "compress",
    "Recipe",
    "load_recipe",
    "NoGainError",
    "Codec",
    "TensorInfo",
    "PackResult",
    "pack",
    "unpack",
    "tune",
    "TuneResult",
    "compress_batch",
    "BatchResult",
}


def test_public_names_are_pinned():
    assert set(modelpress.__all__) == PUBLIC
    for name in PUBLIC:
        assert hasattr(modelpress, name), name


def test_import_does_not_import_frameworks():
    # NOTE: nor the distributed extra: Ray and Optuna load when a tune or batch job starts
    code = (
        "import sys, modelpress\n"
        "modelpress.get_registry()\n"
        "bad = [m for m in ('torch', 'tensorflow', 'keras', 'tf2onnx', 'ray', 'optuna', 'sqlalchemy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_ir_is_imported_as_it_is():
    # NOTE: onnx-ir imports sympy at module level (SymbolicDim arithmetic); modelpress defers it with
    # LazyLoader (the real module object, no stand-in; docs/architecture.md, "The IR")
    code = (
        "import sys, modelpress\n"
        "assert 'onnx_ir' not in sys.modules and 'sympy' not in sys.modules\n"
        "import modelpress.testing\n"
        "modelpress.quantize(modelpress.testing.tiny_mlp(), 'fp16', show_progress=False)\n"
        "import onnx_ir as ir, onnx_ir._core, sympy\n"
        "assert onnx_ir._core.sympy is sympy and str(ir.SymbolicDim('N') * 2 + 1) == '2*N + 1'\n"
        "assert not [f for f in sys.meta_path if type(f).__module__.startswith('modelpress')]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_error_is_a_modelpress_error():
    for name in PUBLIC:
        obj = getattr(modelpress, name)
        if isinstance(obj, type) and issubclass(obj, Exception) and not issubclass(obj, Warning):
            assert issubclass(obj, modelpress.ModelpressError), name
