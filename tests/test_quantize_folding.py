"""int8-static's exact float-graph rewrites (plugins/quantize/folding.py) on small graphs built here:
each keeps the model's outputs (to float rounding, run in ORT) and removes the ops it says it does;
a value something else reads is never rescaled."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from modelpress.plugin_api import make_session
from modelpress.plugin_api import run as run_session
from modelpress.plugins.quantize.folding import (
    fold_scale,
    fuse_layer_norms,
    move_attention_biases,
    move_residual_biases,
)
from modelpress.testing import make_model

D, H, T = 8, 2, 5
RNG = np.random.default_rng(0)


def _w(*shape: int) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


def _layer_norm(x: str, name: str, init: dict) -> tuple[list, str]:
    """A LayerNorm as older exporters decompose it (``d * d``, Div by Sqrt)."""
    init.update({f"{name}_eps": np.float32(1e-5), f"{name}_g": _w(D), f"{name}_b": _w(D)})
    n = lambda op, ins, out, **kw: helper.make_node(op, ins, [f"{name}_{out}"], **kw)  # noqa: E731
    nodes = [
        helper.make_node("ReduceMean", [x], [f"{name}_mean"], axes=[-1], keepdims=1),
        helper.make_node("Sub", [x, f"{name}_mean"], [f"{name}_d"]),
        n("Mul", [f"{name}_d", f"{name}_d"], "sq"),
        n("ReduceMean", [f"{name}_sq"], "var", axes=[-1], keepdims=1),
        n("Add", [f"{name}_var", f"{name}_eps"], "ve"),
        n("Sqrt", [f"{name}_ve"], "std"),
        n("Div", [f"{name}_d", f"{name}_std"], "norm"),
        n("Mul", [f"{name}_norm", f"{name}_g"], "scaled"),
        n("Add", [f"{name}_scaled", f"{name}_b"], "y"),
    ]
    return nodes, f"{name}_y"


def _linear(x: str, name: str, init: dict, k: int = D, n: int = D) -> tuple[list, str]:
    init.update({f"{name}_W": (_w(k, n) / np.sqrt(k)).astype(np.float32), f"{name}_bias": _w(n)})
    return [
        helper.make_node("MatMul", [x, f"{name}_W"], [f"{name}_mm"]),
        helper.make_node("Add", [f"{name}_mm", f"{name}_bias"], [f"{name}_out"]),
    ], f"{name}_out"


def _heads(x: str, name: str, perm: list[int], init: dict) -> tuple[list, str]:
    init[f"{name}_shape"] = np.array([1, -1, H, D // H], np.int64)
    return [
        helper.make_node("Reshape", [x, f"{name}_shape"], [f"{name}_r"]),
        helper.make_node("Transpose", [f"{name}_r"], [f"{name}_t"], perm=perm),
    ], f"{name}_t"


def _encoder() -> tuple[object, dict[str, np.ndarray]]:
    """One post-LN attention block with its feed-forward, as BERT exporters write it."""
    init: dict[str, np.ndarray] = {"scale": np.float32(np.sqrt(D // H))}
    init["merge"] = np.array([1, -1, D], np.int64)
    nodes, x = _layer_norm("x", "ln0", init)
    for name in ("q", "k", "v"):
        more, out = _linear(x, name, init)
        heads, _ = _heads(out, name, [0, 2, 3, 1] if name == "k" else [0, 2, 1, 3], init)
        nodes += more + heads
    nodes += [
        helper.make_node("MatMul", ["q_t", "k_t"], ["scores"]),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "v_t"], ["ctx4"]),
        helper.make_node("Transpose", ["ctx4"], ["ctx_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx"]),
    ]
    more, o = _linear("ctx", "o", init)
    nodes += [*more, helper.make_node("Add", [o, x], ["res1"])]
    more, y1 = _layer_norm("res1", "ln1", init)
    nodes += more
    more, h = _linear(y1, "ff1", init, D, 4 * D)
    nodes += [*more, helper.make_node("Relu", [h], ["act"])]
    more, f = _linear("act", "ff2", init, 4 * D, D)
    nodes += [*more, helper.make_node("Add", [f, y1], ["res2"])]
    more, y = _layer_norm("res2", "ln2", init)
    nodes += [*more, helper.make_node("Identity", [y], ["out"])]
    for i, node in enumerate(
        nodes
    ):  # NOTE: int8-static's planning needs named nodes (exporters name them)
        node.name = node.name or f"{node.op_type}_{i}"
    model = make_model(
        nodes,
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "t", D]),
            helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, 1, "t"]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "t", D])],
        init,
        opset=17,
    )
    mask = np.zeros((1, 1, 1, T), np.float32)
    mask[..., -1] = -10000.0
    return model, {"x": 3 * _w(1, T, D), "mask": mask}


def _outputs(model, feeds: dict[str, np.ndarray]) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.asarray(run_session(make_session(model, spin=False), feeds)[0])


def _ops(model) -> list[str]:  # type: ignore[no-untyped-def]
    return [n.op_type for n in model.graph]


@pytest.fixture
def encoder():  # type: ignore[no-untyped-def]
    model, feeds = _encoder()
    return model, feeds, _outputs(model, feeds)


def test_decomposed_layer_norms_become_one_op_with_the_same_outputs(encoder) -> None:
    model, feeds, expected = encoder
    assert fuse_layer_norms(model) == 3
    ops = _ops(model)
    assert ops.count("LayerNormalization") == 3 and "ReduceMean" not in ops and "Sqrt" not in ops
    np.testing.assert_allclose(_outputs(model, feeds), expected, rtol=1e-4, atol=1e-5)


def test_layer_norms_are_left_below_opset_17() -> None:
    model, _ = _encoder()
    model.ir.opset_imports[""] = 16
    assert fuse_layer_norms(model) == 0 and "LayerNormalization" not in _ops(model)


def test_key_bias_dropped_value_bias_moved_into_the_output_projection(encoder) -> None:
    model, feeds, expected = encoder
    adds = _ops(model).count("Add")
    assert move_attention_biases(model) == {"key": 1, "value": 1}
    names = {n.name for n in model.graph}
    assert _ops(model).count("Add") == adds - 2 and not any("k_" in n and "Add" in n for n in names)
    readers = {
        n.op_type
        for n in model.graph
        for v in n.inputs
        if v is not None and v.name in ("k_bias", "v_bias")
    }
    assert not readers  # NOTE: both bias constants are no longer read
    np.testing.assert_allclose(_outputs(model, feeds), expected, rtol=1e-4, atol=1e-4)


def test_a_residual_bias_moves_into_the_layer_norm_that_computes_the_residual(encoder) -> None:
    model, feeds, expected = encoder
    fuse_layer_norms(model)
    move_attention_biases(model)
    adds = _ops(model).count("Add")
    # NOTE: the FFN's output bias goes into ln1's beta, ff1's bias compensates; the attention output's
    # bias stays (ln0's other readers, V and K, have no bias Add left to compensate in)
    assert move_residual_biases(model) == 1
    assert _ops(model).count("Add") == adds - 1
    np.testing.assert_allclose(_outputs(model, feeds), expected, rtol=1e-4, atol=1e-4)


def _scale_on(model, value: str, s: np.ndarray, reader: str | None = None):  # type: ignore[no-untyped-def]
    """A SmoothQuant-style ``Mul`` by ``1/s`` on the edges from ``value`` to its readers (to the MatMul of weight ``reader`` alone)."""
    x = next(v for n in model.graph for v in n.outputs if v.name == value)
    inv = model.add_initializer(f"{value}_inv", (1.0 / s).astype(np.float32))
    only = (
        [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].name == reader]
        if reader
        else None
    )
    return model.insert_after(x, "Mul", [inv], name=f"{value}_smooth", consumers=only).producer()


def test_a_scale_on_the_attention_output_folds_into_the_value_projection(encoder) -> None:
    model, feeds, expected = encoder
    move_attention_biases(model)
    s = np.exp(RNG.normal(size=D)).astype(np.float32)
    o_weight = model.initializer("o_W")
    model.replace_initializer("o_W", o_weight.const_value.numpy() * s[:, None])
    mul = _scale_on(model, "ctx", s)
    v_weight = model.initializer("v_W").const_value.numpy().copy()
    assert fold_scale(model, mul)
    assert all(n.name != "ctx_smooth" for n in model.graph)
    np.testing.assert_allclose(
        model.initializer("v_W").const_value.numpy(), v_weight / s, rtol=1e-6
    )
    np.testing.assert_allclose(_outputs(model, feeds), expected, rtol=1e-4, atol=1e-4)


def test_a_scale_folds_into_a_layer_norm_only_where_nothing_else_reads_it(encoder) -> None:
    model, feeds, expected = encoder
    fuse_layer_norms(model)
    s = np.exp(RNG.normal(size=D)).astype(np.float32)
    # ln1's output also feeds the residual Add: refused, nothing changed
    before = model.initializer("ln1_b").const_value.numpy().copy()
    for name in ("ff1_W",):
        model.replace_initializer(name, model.initializer(name).const_value.numpy() * s[:, None])
    mul = _scale_on(model, "ln1_y", s, reader="ff1_W")
    assert not fold_scale(model, mul)
    np.testing.assert_array_equal(model.initializer("ln1_b").const_value.numpy(), before)
    # the frozen weight (GPTQ codes made for it) is not rescaled either
    mul_o = _scale_on(model, "ctx", np.ones(D, np.float32))
    assert not fold_scale(model, mul_o, frozen=frozenset({"v_W"}))
    np.testing.assert_allclose(_outputs(model, feeds), expected, rtol=1e-4, atol=1e-4)


def test_a_scale_on_a_layer_norm_read_by_nothing_else_goes_into_gamma_and_beta(encoder) -> None:
    model, feeds, _ = encoder
    fuse_layer_norms(model)
    s = np.exp(RNG.normal(size=D)).astype(np.float32)
    mul = _scale_on(model, "ln2_y", s)
    scaled = _outputs(model, feeds)
    assert fold_scale(model, mul)
    assert "Mul" not in {n.op_type for n in model.graph if n.name.endswith("_smooth")}
    np.testing.assert_allclose(_outputs(model, feeds), scaled, rtol=1e-4, atol=1e-5)


def test_int8_static_folds_the_graph_before_calibrating_and_says_so() -> None:
    import modelpress

    model, _ = _encoder()
    mask = np.zeros((32, 1, 1, T), np.float32)
    calibration = {"x": 3 * _w(32, T, D), "mask": mask}

    def figures(**kw: object) -> dict:
        result = modelpress.quantize(
            model,
            "int8-static",
            calibration=calibration,
            show_progress=False,
            sensitivity=False,
            **kw,
        )
        return result.provenance.passes[-1].figures

    assert figures()["graph_folds"] == {"layer_norms": 3, "key": 1, "value": 1, "residual": 1}
    assert "graph_folds" not in figures(fold_graph=False)
