"""Large weights on the memory-saving paths: shape inference at load runs without their bytes, and
ORT sessions receive them by reference (``add_external_initializers``); the results are the same."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.runtime.session import make_session, run


def _big_matmul(path, rows: int = 300) -> np.ndarray:
    """x [N, 300] @ W [300, 300] (360 KB: above the by-reference size) + b, reshaped by a small shape tensor."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(rows, rows)).astype(np.float32)
    b = rng.normal(size=(rows,)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "b"], ["a"]),
            helper.make_node("Reshape", ["a", "shape"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10, rows // 10])],
        [
            numpy_helper.from_array(w, "W"),
            numpy_helper.from_array(b, "b"),
            numpy_helper.from_array(np.array([-1, 10, rows // 10], np.int64), "shape"),
        ],
    )
    # NOTE: values in float_data, as tf2onnx writes some, not raw_data
    graph.initializer[0].ClearField("raw_data")
    graph.initializer[0].float_data.extend(w.ravel().tolist())
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return w


def test_load_infers_shapes_and_keeps_large_weights(tmp_path):
    w = _big_matmul(tmp_path / "m.onnx")
    model = modelpress.load(tmp_path / "m.onnx", show_progress=False)
    np.testing.assert_array_equal(model.initializer("W").const_value.numpy(), w)
    # NOTE: shape inference ran (the weights' bytes were left out of it, not their shapes)
    h = next(node.outputs[0] for node in model.graph if node.op_type == "MatMul")
    assert h.shape is not None and list(h.shape)[1:] == [300]


def test_session_gets_large_weights_by_reference_and_the_model_keeps_them(tmp_path):
    w = _big_matmul(tmp_path / "m.onnx")
    model = modelpress.load(tmp_path / "m.onnx", show_progress=False)
    before = model.initializer("W").const_value
    session = make_session(model)
    assert (
        model.initializer("W").const_value is before
    )  # NOTE: the stand-in reference is gone again
    x = np.random.default_rng(1).normal(size=(4, 300)).astype(np.float32)
    b = model.initializer("b").const_value.numpy()
    expected = (x @ w + b).reshape(-1, 10, 30)
    for _ in range(2):  # NOTE: the arrays handed to ORT live as long as the session
        np.testing.assert_allclose(run(session, {"x": x})[0], expected, rtol=1e-4, atol=1e-3)
    sweep = make_session(model, spin=False)  # NOTE: no memory arena for sweeps: same results
    np.testing.assert_allclose(run(sweep, {"x": x})[0], expected, rtol=1e-4, atol=1e-3)
    result = modelpress.export(model, tmp_path / "out.onnx", sample={"x": x}, show_progress=False)
    assert result.verification.max_abs_diff == 0.0
    np.testing.assert_array_equal(
        numpy_helper.to_array(onnx.load(tmp_path / "out.onnx").graph.initializer[0]), w
    )
