"""``model_bytes``: the serialised size of a model, exactly, computed without serialising its large
weights (the no-gain check's two sizes were two full copies of the model at the end of a pass)."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.app.pipeline import model_bytes


def _serialised(model: modelpress.Model) -> int:
    return int(ir.serde.serialize_model(model.ir).ByteSize())


def _model(tmp_path, sizes: list[int], *, typed_data: bool = False) -> modelpress.Model:
    """out_i = Identity(W_i), W_i of ``sizes[i]`` values: floats as raw_data, or (``typed_data``) int64s
    in int64_data (varints: a size of their own), which the IR keeps in its own encoding."""
    rng = np.random.default_rng(0)
    inits, nodes, outputs = [], [helper.make_node("Identity", ["x"], ["y"])], []
    for i, size in enumerate(sizes):
        if typed_data:
            values = rng.integers(0, 1000, size=size).tolist()
            tensor = helper.make_tensor(f"W{i}", TensorProto.INT64, [size], values)
        else:
            tensor = numpy_helper.from_array(rng.normal(size=size).astype(np.float32), f"W{i}")
        inits.append(tensor)
        nodes.append(helper.make_node("Identity", [f"W{i}"], [f"out{i}"]))
        outputs.append(helper.make_tensor_value_info(f"out{i}", tensor.data_type, [size]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2]), *outputs],
        inits,
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return modelpress.load(path, show_progress=False, normalize=False)


# NOTE: sizes around the varint boundaries of a tensor's and the graph's length (2**14, 2**21 bytes)
@pytest.mark.parametrize("sizes", [[8], [1024, 1024], [4095, 4097], [2**19 - 3], [2**19 + 7, 300]])
@pytest.mark.parametrize("typed_data", [False, True])
def test_the_size_is_the_serialised_size(tmp_path, sizes, typed_data):
    model = _model(tmp_path, sizes, typed_data=typed_data)
    assert model_bytes(model) == _serialised(model)


def test_in_memory_weights_of_every_kind_are_sized_exactly(tmp_path):
    """Replaced weights (as a pass leaves them): numpy-backed, int4-packed, with a doc string, strings."""
    model = _model(tmp_path, [3000, 3000, 3000])
    graph = model.ir.graph
    rng = np.random.default_rng(1)
    graph.initializers["W0"].const_value = ir.Tensor(rng.normal(size=3000).astype(np.float32))
    graph.initializers["W1"].const_value = ir.Tensor(
        rng.normal(size=3000).astype(np.float32), doc_string="a weight with a doc string"
    )
    packed = ir.PackedTensor(
        np.zeros(1 << 14, np.uint8), ir.DataType.INT4, shape=ir.Shape([1 << 15]), name="packed"
    )
    text = ir.StringTensor(np.array([b"a" * 5000], dtype=object), name="text")
    for name, tensor in (("packed", packed), ("text", text)):
        value = ir.Value(name=name, const_value=tensor)
        graph.register_initializer(value)
    before = {name: v.const_value for name, v in graph.initializers.items()}
    assert model_bytes(model) == _serialised(model)
    assert {name: v.const_value for name, v in graph.initializers.items()} == before
    assert all(v.const_value is before[name] for name, v in graph.initializers.items())


def test_a_weight_under_another_name_is_sized_under_its_value_name(tmp_path):
    """A weight whose proto carries another name than its value's (silero-vad's branch weights lifted to
    the main graph, fresh from load) keeps it until a serialisation renames it: sized as written."""
    model = _model(tmp_path, [3000, 3000])
    proto = numpy_helper.from_array(np.ones(3000, np.float32), "a_much_longer_name_than_W0_has")
    model.ir.graph.initializers["W0"].const_value = ir.TensorProtoTensor(proto)
    size = model_bytes(model)
    assert size == _serialised(model)
