"""The import floor of a quantization: sympy (onnx-ir imports it for symbolic-dimension arithmetic,
~34 MB of RSS) is deferred with the standard library's LazyLoader and never really imported by a
load, an int8-static quantization and a verified export; symbolic arithmetic, a user's ``import
sympy`` and torch's symbolic shapes still get the real module (one module object throughout).
Each check runs in a fresh child process: what a process imported is its own."""

import json
import subprocess
import sys

import pytest

# NOTE: what a real import of sympy leaves in sys.modules (the deferred module object is there
# from onnx-ir's `import sympy` on, as a module whose first attribute read imports sympy)
SYMPY_LOADED = ("sympy.core", "mpmath")

# NOTE: never on the quantize path: frameworks and data-science stacks
NEVER = ("torch", "tensorflow", "scipy", "pandas", "sklearn", "onnxscript")


def _child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_load_quantize_and_export_never_import_sympy(tmp_path):
    code = (
        "import json, sys, onnx, modelpress, modelpress.testing as t\n"
        f"path = {str(tmp_path / 'm.onnx')!r}\n"
        "onnx.save(t.tiny_cnn(channels=32, size=16).to_proto(), path)\n"
        "model = modelpress.load(path)\n"
        "data = modelpress.sample_inputs(model.signature, batch=8)\n"
        "result = modelpress.quantize(model, 'int8-static', calibration=data, show_progress=False)\n"
        f"modelpress.export(result, {str(tmp_path / 'q.onnx')!r}, sample=data, show_progress=False)\n"
        f"loaded = sorted(m for m in {SYMPY_LOADED + NEVER!r} if m in sys.modules)\n"
        "import onnx_ir\n"
        "deferred = onnx_ir._core.sympy is sys.modules['sympy']\n"
        "finders = [type(f).__module__ for f in sys.meta_path if type(f).__module__.startswith('modelpress')]\n"
        "print(json.dumps({'loaded': loaded, 'deferred': deferred, 'finders': finders}))\n"
    )
    out = _child(code)
    assert out == {"loaded": [], "deferred": True, "finders": []}


def test_symbolic_arithmetic_and_import_sympy_get_the_real_module():
    code = (
        "import json, sys, modelpress, modelpress.testing as t\n"
        "modelpress.quantize(t.tiny_mlp(), 'fp16', show_progress=False)\n"
        "import onnx_ir as ir\n"
        "before = 'sympy.core' in sys.modules\n"
        "expr = str(ir.SymbolicDim('N') * 2 + 1)\n"
        "value = (ir.SymbolicDim('N') + 1).evaluate({'N': 4})\n"
        "import sympy\n"
        "print(json.dumps({'before': before, 'expr': expr, 'value': value,\n"
        "    'same': ir._core.sympy is sympy, 'real': type(sympy).__name__,\n"
        "    'symbol': sympy.Symbol('x').is_Symbol}))\n"
    )
    assert _child(code) == {
        "before": False,
        "expr": "2*N + 1",
        "value": 5,
        "same": True,
        "real": "module",
        "symbol": True,
    }


def test_sympy_imported_first_is_used_as_it_is():
    code = (
        "import json, sys, sympy, modelpress, modelpress.testing as t\n"
        "real = sys.modules['sympy']\n"
        "modelpress.describe(t.tiny_mlp())\n"
        "import onnx_ir\n"
        "print(json.dumps({'same': onnx_ir._core.sympy is real, 'real': type(real).__name__}))\n"
    )
    assert _child(code) == {"same": True, "real": "module"}


@pytest.mark.slow
def test_torch_symbolic_shapes_work_after_a_model_is_loaded():
    pytest.importorskip("torch")
    code = (
        "import json, modelpress, modelpress.testing as t\n"
        "modelpress.quantize(t.tiny_mlp(), 'fp16', show_progress=False)\n"
        "import torch\n"
        "class Half(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        return x[:, : x.shape[1] // 2] * 2\n"
        "n = torch.export.Dim('n', min=2, max=64)\n"
        "ep = torch.export.export(Half(), (torch.randn(2, 8),), dynamic_shapes={'x': {1: 2 * n}})\n"
        "print(json.dumps({'ranges': sorted(str(k) for k in ep.range_constraints)}))\n"
    )
    ranges = _child(code)["ranges"]
    assert len(ranges) == 2 and any(r.startswith("2*") for r in ranges), ranges
