"""What a quantize + export of an ONNX model keeps resident: an import budget for the plugin
registry, folded constants that own their values, and a loaded model whose If branches are not
held twice (counts and the kernel's memory figures, never timings)."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress

# NOTE: modules a quantize + export of an ONNX model never needs unless asked (yaml: a plugin
# default set in the environment; difflib: a misspelt option's hint)
NOT_AT_REGISTRY = ("yaml", "difflib")


def test_the_registry_loads_without_modules_only_some_runs_need():
    code = (
        "import sys, modelpress\n"
        "registry = modelpress.get_registry()\n"
        f"print(sorted(m for m in {NOT_AT_REGISTRY!r} if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_options_built_on_first_use_still_validate_and_describe():
    """defer_build: the schema is built when first used; validation, its errors and --help rows work."""
    method = modelpress.get_registry().method("int8-static")
    assert method.validate_options({"max_samples": 8}).max_samples == 8
    with pytest.raises(modelpress.OptionsError, match=r"max_sample.*did you mean 'max_samples'"):
        method.validate_options({"max_sample": 8})
    with pytest.raises(modelpress.OptionsError, match="max_samples"):
        method.validate_options({"max_samples": 0})
    assert "max_samples" in {row["name"] for row in method.option_rows()}
    assert "max_samples" in method.options.model_json_schema()["properties"]


def test_folded_constants_own_their_values(tmp_path):
    """A constant subexpression folded on import is an array of its own, not a view of ONNX
    Runtime's output (which kept the folding session's allocator alive for the model's life)."""
    a = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "a")
    b = numpy_helper.from_array(np.full((2, 3), 2.0, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["a", "b"], ["ab"]), helper.make_node("Add", ["x", "ab"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [a, b],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx"
    )
    model = modelpress.load(tmp_path / "m.onnx")
    assert model.provenance.extra["normalize"]["constants_folded"] == 1
    folded = [
        v.const_value
        for v in model.ir.graph.initializers.values()
        if isinstance(v.const_value, ir.Tensor)
    ]
    assert len(folded) == 1
    array = folded[0].numpy()
    np.testing.assert_array_equal(array, np.arange(6, dtype=np.float32).reshape(2, 3) * 2)
    assert array.base is None and array.flags.owndata


_SIDE = 1024  # NOTE: a 4 MB weight per branch: far above the noise of a process's memory


def _if_model(path) -> int:
    """y = If(c, x @ W_then, x @ W_else), both weights inside the branches (as silero-vad's)."""
    rng = np.random.default_rng(0)

    def branch(name):
        w = numpy_helper.from_array(rng.normal(size=(_SIDE, _SIDE)).astype(np.float32), f"W_{name}")
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"W_{name}"], [f"o_{name}"])],
            name,
            [],
            [helper.make_tensor_value_info(f"o_{name}", TensorProto.FLOAT, ["n", _SIDE])],
            [w],
        )

    graph = helper.make_graph(
        [
            helper.make_node(
                "If", ["c"], ["y"], then_branch=branch("then"), else_branch=branch("else")
            )
        ],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", _SIDE]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", _SIDE])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return 2 * _SIDE * _SIDE * 4


_HELD = """
import ctypes, gc, json, re, sys
import modelpress
def rss():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
modelpress.load(sys.argv[1])  # NOTE: every library imported and initialised first
floor = rss()
model = modelpress.load(sys.argv[1])
print(json.dumps({"held": rss() - floor, "check": model.provenance.extra["normalize"]["check"]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_a_loaded_model_holds_its_branch_weights_once(tmp_path):
    """Shape inference's types come back into the parsed file without its If nodes (and the
    weights in their branches) being copied into it: the loaded model holds about its weights
    (1.0x measured; 2.0x when whole If nodes were copied back)."""
    weights = _if_model(tmp_path / "if.onnx")
    out = subprocess.run(
        [sys.executable, "-c", _HELD, str(tmp_path / "if.onnx")],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["check"]["equal"] is True
    assert figures["held"] < 1.5 * weights, figures
