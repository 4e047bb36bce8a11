"""int8-static inside If branches (issue 24, silero-vad's layout): the branch every calibration feed takes is
quantized statically (QDQ inside the branch), the other gets int8 weights with float compute, and the file
is right for both conditions."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

import modelpress
from modelpress.data.samples import load_dataset
from modelpress.runtime.session import make_session, run
from tests.test_graphs import if_branch_model


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [node.op_type for node in graph.node]


def test_int8_static_quantizes_the_taken_branch_and_the_other_weight_only(tmp_path):
    source = if_branch_model()
    model = modelpress.load(source, show_progress=False)
    rng = np.random.default_rng(0)
    calib = {"x": rng.normal(0, 1, (32, 64)).astype(np.float32), "flag": np.array(True)}
    result = modelpress.quantize(model, "int8-static", calibration=calib, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert figures["quantized_nodes"] == 2 and figures["criteria_met"]
    assert "then_branch taken by" in figures["if_branches"]["If_0"]
    assert "its 2 weighted layer(s) int8 weight-only" in figures["if_branches"]["If_0"]
    assert sorted(figures["weight_only_nodes"]) == ["else_fc1", "else_fc2"]
    # NOTE: the other branch's int8 weights counted too
    assert figures["low_bit_weight_share"] == 1.0
    path = modelpress.export(result, tmp_path / "int8.onnx", sample=calib).path
    written = onnx.load(str(path))
    (node,) = [n for n in written.graph.node if n.op_type == "If"]
    branches = {a.name: a.g for a in node.attribute}
    then_ops, else_ops = _ops(branches["then_branch"]), _ops(branches["else_branch"])
    # NOTE: activations and weights quantized inside the taken branch, its int8 weights stored there
    assert then_ops.count("MatMul") == 2 and "QuantizeLinear" in then_ops
    assert {i.data_type for i in branches["then_branch"].initializer} >= {onnx.TensorProto.INT8}
    assert else_ops.count("DequantizeLinear") == 2 and "QuantizeLinear" not in else_ops
    assert not [
        i for i in written.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and i.dims
    ]
    assert path.stat().st_size < 0.35 * len(source.SerializeToString())
    held_out = rng.normal(0, 1, (16, 64)).astype(np.float32)
    for flag in (True, False):  # NOTE: the branch no calibration feed took must be right too
        feeds = {"x": held_out, "flag": np.array(flag)}
        (expected,) = run(make_session(source), feeds)
        (actual,) = run(make_session(path), feeds)
        assert _cosine(expected, actual) > 0.99


def test_scalar_input_makes_each_item_one_whole_feed():
    """A model with a scalar input (silero's sample rate) has no common batch axis: each item is fed whole."""
    model = modelpress.load(if_branch_model(), show_progress=False)
    x = np.zeros((5, 64), np.float32)
    data = load_dataset(
        [{"x": x, "flag": np.array(True)}, {"x": x[:3], "flag": np.array(False)}],
        model.signature,
        what="calibration",
    )
    feeds = list(data.batches(2))
    assert len(data) == 2 and [f["x"].shape for f in feeds] == [(5, 64), (3, 64)]
    assert [bool(f["flag"]) for f in feeds] == [True, False]
    with pytest.raises(modelpress.DataError, match="flag"):
        load_dataset({"x": x, "flag": np.ones(5, bool)}, model.signature, what="calibration")


def test_cli_verification_sample_keeps_a_scalar_input_whole(tmp_path):
    """``modelpress quantize --calib`` verifies on the first samples of the file; a scalar input stays as it is."""
    from modelpress.cli.common import capped_sample

    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((300, 64), np.float32), flag=np.array(True))
    sample = capped_sample(str(path))
    assert sample["x"].shape == (256, 64) and sample["flag"].shape == ()


def _nested_if_model() -> onnx.ModelProto:
    """An If (on ``a``) whose then branch holds a MatMul and another If (on ``b``) with a MatMul in each branch."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(5)

    def weight(name: str) -> onnx.NodeProto:
        values = rng.normal(0, 0.3, (32, 32)).astype(np.float32)
        return helper.make_node(
            "Constant", [], [name], value=onnx.numpy_helper.from_array(values, name)
        )

    def leaf(name: str, source: str) -> onnx.GraphProto:
        nodes = [
            weight(f"{name}.w"),
            helper.make_node("MatMul", [source, f"{name}.w"], [f"{name}.y"], name=f"{name}_fc"),
        ]
        out = helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, ["N", 32])
        return helper.make_graph(nodes, name, [], [out])

    outer_then = leaf("outer", "x")
    outer_then.node.extend(
        [
            helper.make_node("Relu", ["outer.y"], ["outer.r"], name="outer_relu"),
            helper.make_node(
                "If",
                ["b"],
                ["inner.y"],
                name="If_inner",
                then_branch=leaf("inner_then", "outer.r"),
                else_branch=leaf("inner_else", "outer.r"),
            ),
        ]
    )
    del outer_then.output[:]
    outer_then.output.append(helper.make_tensor_value_info("inner.y", TensorProto.FLOAT, ["N", 32]))
    node = helper.make_node(
        "If", ["a"], ["y"], name="If_outer", then_branch=outer_then, else_branch=leaf("other", "x")
    )
    graph = helper.make_graph(
        [node],
        "nested",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32]),
            helper.make_tensor_value_info("a", TensorProto.BOOL, []),
            helper.make_tensor_value_info("b", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return proto


def test_nested_ifs_are_inlined_and_put_back_at_every_level(tmp_path):
    source = _nested_if_model()
    model = modelpress.load(source, show_progress=False)
    rng = np.random.default_rng(1)
    calib = {
        "x": rng.normal(0, 1, (32, 32)).astype(np.float32),
        "a": np.array(True),
        "b": np.array(False),
    }
    result = modelpress.quantize(model, "int8-static", calibration=calib, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert set(figures["if_branches"]) == {"If_outer", "If_inner"}
    assert figures["quantized_nodes"] == 2  # NOTE: outer_fc and inner_else_fc, statically
    path = modelpress.export(result, tmp_path / "int8.onnx", sample=calib).path
    written = onnx.load(str(path))
    assert [n.op_type for n in written.graph.node] == ["If"]
    held_out = rng.normal(0, 1, (16, 32)).astype(np.float32)
    for a in (True, False):
        for b in (True, False):
            feeds = {"x": held_out, "a": np.array(a), "b": np.array(b)}
            (expected,) = run(make_session(source), feeds)
            (actual,) = run(make_session(path), feeds)
            assert _cosine(expected, actual) > 0.99, (a, b)


def test_feeds_on_both_sides_calibrate_the_branch_most_take_on_those(tmp_path):
    """Calibration data at both conditions (silero at both sample rates): the branch most feeds take is
    quantized statically on those feeds, the other gets int8 weights; both conditions stay right."""
    source = if_branch_model()
    model = modelpress.load(source, show_progress=False)
    rng = np.random.default_rng(2)
    x = [rng.normal(0, 1, (8, 64)).astype(np.float32) for _ in range(3)]
    calib = [
        {"x": x[0], "flag": np.array(False)},
        {"x": x[1], "flag": np.array(True)},
        {"x": x[2], "flag": np.array(False)},
    ]
    result = modelpress.quantize(model, "int8-static", calibration=calib, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert figures["if_branches"]["If_0"].startswith(
        "else_branch taken by 2 of 3 calibration feeds"
    )
    assert figures["calibration_samples"] == 2 and figures["quantized_nodes"] == 2
    path = modelpress.export(result, tmp_path / "int8.onnx", sample=calib).path
    for flag in (True, False):
        feeds = {"x": x[1], "flag": np.array(flag)}
        (expected,) = run(make_session(source), feeds)
        (actual,) = run(make_session(path), feeds)
        assert _cosine(expected, actual) > 0.99
