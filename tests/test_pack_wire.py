"""The hand-written protobuf splicer (:mod:`modelpress.packing.wire`) fuzzed against the protobuf encoder.

Hypothesis generates ``TensorProto`` messages (any dtype, dims, name, doc string, raw bytes of any
length, typed fields before ``raw_data``, fields after it: ``double_data``, ``uint64_data``,
external data entries, the data location, metadata properties), places them as initializers,
``Constant`` values, attribute tensor lists and in If branches, clears the ``raw_data`` of a subset
and splices it back: the bytes must be the encoder's, and parse to the same message.
"""

from __future__ import annotations

import io

import onnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from modelpress.packing import walk, wire

_DTYPES = [
    TensorProto.FLOAT,
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.FLOAT16,
    TensorProto.DOUBLE,
    TensorProto.BOOL,
    TensorProto.INT4,
    TensorProto.UINT4,
    TensorProto.BFLOAT16,
]
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def tensors(draw: st.DrawFn) -> TensorProto:
    t = TensorProto()
    t.data_type = draw(st.sampled_from(_DTYPES))
    t.dims.extend(draw(st.lists(st.integers(0, 300), max_size=3)))
    t.name = draw(_text)
    if draw(st.booleans()):
        t.doc_string = draw(_text)
    if draw(
        st.integers(0, 9)
    ):  # NOTE: 0 to >127 bytes (one- and two-byte length prefixes), or absent
        t.raw_data = draw(st.binary(max_size=400))
    if draw(st.booleans()):
        t.float_data.extend(draw(st.lists(st.floats(width=32, allow_nan=False), max_size=3)))
    if draw(st.booleans()):
        t.int64_data.extend(draw(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3)))
    if draw(st.booleans()):
        t.double_data.extend(
            draw(st.lists(st.floats(allow_nan=False), max_size=3))
        )  # field 10: after raw_data
    if draw(st.booleans()):
        t.uint64_data.extend(draw(st.lists(st.integers(0, 2**64 - 1), max_size=3)))  # field 11
    if draw(st.booleans()):
        entry = t.external_data.add()  # field 13
        entry.key, entry.value = "location", draw(_text)
    if draw(st.booleans()):
        # NOTE: field 14; onnx.proto is proto2: a field set to 0 is written
        t.data_location = draw(st.sampled_from([TensorProto.DEFAULT, TensorProto.EXTERNAL]))
    if draw(st.booleans()):
        prop = t.metadata_props.add()  # field 16
        prop.key, prop.value = draw(_text), draw(_text)
    return t


@st.composite
def models(draw: st.DrawFn) -> onnx.ModelProto:
    """A graph holding generated tensors everywhere :func:`walk.tensors` looks: initializers,
    a Constant's ``value``, an attribute's ``tensors`` list, and an If's branch graphs."""
    inits = draw(st.lists(tensors(), max_size=4))
    nodes = [helper.make_node("Constant", [], ["c"], value=draw(tensors()))]
    # NOTE: an op that gives its inputs roles (weight, bias, table...) or none, fed by initializers
    op = draw(st.sampled_from(["Custom", "MatMul", "Gemm", "Conv", "Gather", "DequantizeLinear"]))
    listed = helper.make_node(op, ["c", *(t.name for t in inits[:2])], ["d"], domain="test")
    listed.attribute.append(
        helper.make_attribute("tables", draw(st.lists(tensors(), min_size=1, max_size=3)))
    )
    nodes.append(listed)
    if draw(st.booleans()):
        branches = [
            helper.make_graph(
                [helper.make_node("Constant", [], [f"{side}_c"], value=draw(tensors()))],
                side,
                [],
                [helper.make_tensor_value_info(f"{side}_c", TensorProto.FLOAT, None)],
                draw(st.lists(tensors(), max_size=2)),
            )
            for side in ("then", "else")
        ]
        nodes.append(
            helper.make_node("If", ["d"], ["e"], then_branch=branches[0], else_branch=branches[1])
        )
    graph = helper.make_graph(
        nodes, "fuzz", [], [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model=models(), data=st.data())
def test_the_splicer_writes_the_encoders_bytes_for_generated_tensors(model, data):
    full = model.SerializeToString()
    found = list(walk.tensors(model))
    chosen = data.draw(st.sets(st.integers(0, max(len(found) - 1, 0))))
    removed = {}
    for index, (_name, tensor) in enumerate(found):
        if index in chosen and tensor.HasField(
            "raw_data"
        ):  # NOTE: proto2: b"" set is a field on the wire too
            removed[index] = tensor.raw_data
            tensor.ClearField("raw_data")
    graph = model.SerializeToString()
    spans = wire.tensor_spans(graph)
    assert spans is not None and len(spans) == len(found)
    fills = {spans[i][0]: (len(raw), lambda raw=raw: raw) for i, raw in removed.items()}
    out = io.BytesIO()
    written = wire.splice(graph, fills, out)
    assert out.getvalue() == full and written == len(full)
    back = onnx.ModelProto()
    back.ParseFromString(out.getvalue())
    for index, raw in removed.items():
        found[index][1].raw_data = raw
    assert back == model


@settings(max_examples=60, deadline=None)
@given(model=models())
def test_the_walker_finds_each_tensor_where_the_encoder_put_it(model):
    """Each span from :func:`wire.tensor_spans` parses to the tensor :func:`walk.tensors` yields at that place."""
    graph = model.SerializeToString()
    spans = wire.tensor_spans(graph)
    found = list(walk.tensors(model))
    assert spans is not None and len(spans) == len(found)
    for (start, end), (_name, tensor) in zip(spans, found, strict=True):
        parsed = TensorProto()
        parsed.ParseFromString(graph[start:end])
        assert parsed == tensor


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models())
def test_the_light_reader_reads_what_the_parsed_walk_gives(model):
    """:func:`wire.model_tensors` (what ``unpack`` reads, no onnx parse) gives every tensor's name,
    element type, dims and external data, and every role, as :mod:`walk` does on the parsed model."""
    graph = model.SerializeToString()
    found = wire.model_tensors(graph)
    assert found is not None
    expected = [
        (
            name,
            t.data_type,
            list(t.dims),
            walk.external_info(t) if t.data_location == TensorProto.EXTERNAL else None,
        )
        for name, t in walk.tensors(model)
    ]
    assert [(t.name, t.data_type, t.dims, t.external) for t in found.tensors] == expected
    assert [t.span for t in found.tensors] == wire.tensor_spans(graph)
    assert found.roles == walk.roles(model.graph)
