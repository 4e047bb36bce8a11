"""The graph-building toolkit on Model: builder, consumers/producer/fresh_name, layer attributes,
cleanup, in-memory shape inference, Model.from_onnx."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import assert_valid, make_model, tiny_cnn, tiny_mlp


def _gemm(model, name):
    return next(layer for layer in model.weighted_layers() if layer.name == name)


def test_builder_names_are_unique_and_types_inferred():
    model = tiny_mlp(in_features=8, hidden=16)
    fc1 = _gemm(model, "fc1")
    b = model.builder("fc1")
    first = b.op("Relu", [fc1.node.outputs[0]], name="fc1")  # "fc1" is the Gemm's name already
    second = b.op("Relu", [fc1.node.outputs[0]], name="fc1")
    names = {first.producer().name, second.producer().name, "fc1"}
    assert len(names) == 3 and len({first.name, second.name}) == 2
    assert first.dtype == ir.DataType.FLOAT
    assert first.shape is not None and first.shape[1] == 16  # [N, 16] from the Gemm's output type
    cast = b.op("Cast", [first], {"to": ir.DataType.FLOAT16})
    assert cast.dtype == ir.DataType.FLOAT16
    shape = b.initializer(np.array([-1, 4, 4], np.int64), "fc1.shape")
    reshaped = b.op("Reshape", [first, shape])  # data propagation reads the small constant
    assert reshaped.shape is not None and list(reshaped.shape)[1:] == [4, 4]
    assert shape.name in model.graph.initializers and b.initializers == (shape,)
    assert all(node.graph is None for node in b.nodes)  # recorded, not inserted


def test_replace_one_matmul_by_two_matches_the_factorised_product():
    model = tiny_mlp(in_features=8, hidden=16, classes=4)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    (before,) = run(make_session(model), {"x": x})
    fc2 = _gemm(model, "fc2")
    assert fc2.trans_b and fc2.alpha == 1.0 and fc2.beta == 1.0 and not fc2.trans_a
    w = fc2.weight_array().T  # [in, out]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    rank = 2
    b = model.builder(fc2.name)
    u_v = b.initializer((u[:, :rank] * s[:rank]).astype(np.float32), f"{fc2.name}.u")
    v_v = b.initializer(vt[:rank].astype(np.float32), f"{fc2.name}.v")
    h = b.op("MatMul", [fc2.node.inputs[0], u_v])
    y = b.op("Gemm", [h, v_v, fc2.bias], {"alpha": fc2.alpha, "beta": fc2.beta})
    assert h.shape is not None and h.shape[1] == rank
    model.replace_node(fc2.node, list(b.nodes), y)
    assert_valid(model)
    (after,) = run(make_session(model), {"x": x})
    relu = np.maximum(
        x @ _gemm(model, "fc1").weight_array().T + _gemm(model, "fc1").bias_array(), 0
    )
    expected = relu @ (u[:, :rank] * s[:rank]) @ vt[:rank] + fc2.bias_array()
    np.testing.assert_allclose(after, expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)  # rank 2 of 4 really changed the layer
    assert fc2.weight.name not in model.graph.initializers  # the unused weight went with the node


def test_consumers_producer_and_fresh_name():
    model = tiny_mlp()
    fc1 = _gemm(model, "fc1")
    h = fc1.node.outputs[0]
    assert model.producer(h) is fc1.node
    assert [n.op_type for n in model.consumers(h)] == ["Relu"]
    assert model.producer(model.graph.inputs[0]) is None
    assert model.consumers(fc1.weight) == [fc1.node]
    names = {model.fresh_name("h") for _ in range(3)}
    assert len(names) == 3 and "h" not in names  # "h" is taken by the Gemm's output
    assert model.fresh_name("fc1", node=True) == "fc1_1"


def test_conv_attribute_accessors():
    cnn = tiny_cnn(channels=4)
    conv1 = _gemm(cnn, "conv1")
    assert conv1.pads == [1, 1, 1, 1] and conv1.strides == [1, 1] and conv1.dilations == [1, 1]
    assert (
        conv1.group == 1
        and conv1.spatial_rank == 2
        and conv1.attribute("auto_pad", "NOTSET") == "NOTSET"
    )
    assert _gemm(cnn, "fc").trans_b


def test_cleanup_drops_dead_nodes_sorts_and_reinfers():
    model = tiny_mlp()
    fc1 = _gemm(model, "fc1")
    b = model.builder("extra")
    dead = b.op("Neg", [fc1.node.outputs[0]])
    b.insert()  # appended at the end: dead and unused
    relu = model.consumers(fc1.node.outputs[0])[0]
    # NOTE: move the Relu to the end: out of topological order
    model.graph.remove(relu)
    model.graph.append(relu)
    relu.outputs[0].shape = None
    assert model.cleanup()
    assert dead.producer() not in list(model.graph)
    order = {id(n): i for i, n in enumerate(model.graph)}
    assert order[id(relu)] < order[id(model.consumers(relu.outputs[0])[0])]
    assert relu.outputs[0].shape is not None  # re-inferred
    assert_valid(model)


def test_infer_shapes_reports_an_inconsistent_graph():
    model = tiny_mlp(in_features=8)
    fc1 = _gemm(model, "fc1")
    model.replace_initializer(fc1.weight.name, np.zeros((16, 3), np.float32))  # in 8 != 3
    with pytest.raises(modelpress.InvalidModelError, match="shape inference"):
        model.infer_shapes(reset=True)


def test_infer_shapes_never_serialises_weights_over_2gb():
    # NOTE: a 2.2 GB weight that takes no memory (a broadcast view): a full proto round trip
    # would have to copy it and cannot exceed protobuf's 2 GB; inference in memory never reads it.
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [x],
        [y],
        {"w": np.zeros((2, 2), np.float32)},
        normalize=False,
    )
    huge = np.broadcast_to(np.float32(0.5), (23_000, 24_000))
    weight = model.graph.initializers["w"]
    weight.const_value = ir.Tensor(huge, name="w")
    weight.shape = ir.Shape(huge.shape)
    assert weight.const_value.nbytes > 2**31
    model.graph.inputs[0].shape = ir.Shape(["N", 23_000])
    out = model.graph.outputs[0]
    out.shape = None
    model.infer_shapes()
    assert list(out.shape)[1] == 24_000
    assert weight.const_value.raw is huge  # untouched


def test_from_onnx_checks_and_keeps_provenance():
    proto = tiny_mlp().to_proto()
    provenance = modelpress.Provenance(source_framework="toy", source="toy.bin", importer="a test")
    model = modelpress.Model.from_onnx(proto, provenance=provenance)
    assert model.provenance.source_framework == "toy" and model.signature.input_names == ["x"]
    assert_valid(model)
    proto.graph.node[0].input[1] = "missing"
    with pytest.raises(modelpress.InvalidModelError, match=r"toy\.bin"):
        modelpress.Model.from_onnx(proto, provenance=provenance)
    with pytest.raises(modelpress.InvalidModelError, match="ModelProto"):
        modelpress.Model.from_onnx(b"bytes", provenance=provenance)  # type: ignore[arg-type]
