"""The fast decode paths of ``modelpress pack``: the byte-grouped float decoder, the wire-level
splicing writer of ``unpack``, and the registry that ``modelpress.load`` carries into the
``.mpk`` adapter. Every check is bit for bit against the input bytes."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.packing import reader, walk
from modelpress.packing import wire as packwire
from modelpress.plugin.codec import Codec, TensorInfo
from modelpress.plugins.pack import streams

_WIDTH = {
    ir.DataType.FLOAT: 4,
    ir.DataType.FLOAT16: 2,
    ir.DataType.BFLOAT16: 2,
    ir.DataType.DOUBLE: 8,
}


def _bytegroup() -> Codec:
    codec = modelpress.get_registry().codec("bytegroup")
    assert codec is not None
    return codec


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(list(_WIDTH)),
    count=st.integers(1, 1100),
    kind=st.sampled_from(["random-bits", "weights", "specials"]),
    seed=st.integers(0, 2**16),
)
def test_bytegroup_round_trips_any_bit_pattern(dtype, count, kind, seed):
    """Stored planes (random bits), entropy-coded planes (weights) and NaN/inf/-0 payloads, at
    lengths that are not a multiple of any block size, in every float width."""
    rng = np.random.default_rng(seed)
    width = _WIDTH[dtype]
    if kind == "random-bits":
        data = rng.integers(0, 256, count * width, dtype=np.uint8).tobytes()
    elif kind == "weights":
        data = (rng.standard_normal(count) * 0.02).astype(np.float64 if width == 8 else np.float32)
        data = (
            data.astype(np.float16).tobytes()
            if dtype == ir.DataType.FLOAT16
            else (
                (data.view(np.uint32) >> 16).astype(np.uint16).tobytes()
                if dtype == ir.DataType.BFLOAT16
                else data.tobytes()
            )
        )
    else:
        specials = {
            2: [0x7E01, 0xFC00, 0x7C00, 0x8000, 0x7FFF, 0xFF81],
            4: [0x7FC00001, 0x7F800000, 0xFF800000, 0x80000000, 0xFFFFFFFF],
            8: [0x7FF8000000000001, 0xFFF0000000000000, 0x8000000000000000, 0x7FF0000000000000],
        }[width]
        data = rng.choice(np.array(specials, dtype=f"<u{width}"), count).tobytes()
    info = TensorInfo("t", dtype, (count,))
    codec = _bytegroup()
    blob = codec.encode(data, info)
    assert blob is not None
    assert codec.decode(blob, info) == data


def test_bytegroup_edge_sizes_and_damage():
    codec = _bytegroup()
    assert (
        codec.encode(b"", TensorInfo("e", ir.DataType.FLOAT, (0,))) is None
    )  # empty: left to the container (stored)
    one = np.float32(-0.0).tobytes()
    info = TensorInfo("one", ir.DataType.FLOAT, (1,))
    assert codec.decode(codec.encode(one, info), info) == one
    two = np.array([np.nan, np.inf], np.float32).tobytes()
    blob = codec.encode(two, TensorInfo("two", ir.DataType.FLOAT, (2,)))
    with pytest.raises(
        ValueError, match="byte planes, expected 2"
    ):  # the same blob read as fp16: refused, not garbage
        codec.decode(blob, TensorInfo("two", ir.DataType.FLOAT16, (4,)))


def test_a_stored_stream_is_read_in_place():
    payload = bytes(range(200))
    blob = bytes([streams.STORED]) + payload
    view = streams.decode_view(blob)
    assert isinstance(view, memoryview) and view == payload and streams.decode(blob) == payload
    coded = streams.encode(b"\0" * 4000, fast=True)
    assert coded[0] == streams.ZSTD and bytes(streams.decode_view(coded)) == b"\0" * 4000


def _exponent_plane(size: int, seed: int = 0) -> np.ndarray:
    """The exponent byte of bf16 weights (a 2.6-bit plane with runs: where zstd's matches lose)."""
    w = (np.random.default_rng(seed).standard_normal(size) * 0.02).astype(np.float32)
    return ((w.view(np.uint32) >> 23) & 0xFF).astype(np.uint8)


def test_byte_planes_are_huffman_coded_with_no_matches():
    """With zstd's sequence API (cffi), a plane is literals only: a pattern repeated 1,000 times
    is not found (a matching coder makes it ~100x smaller), an exponent plane comes out smaller
    than zstd's matching coder makes it, and a plain zstd decoder reads both."""
    import zstandard

    pytest.importorskip("_cffi_backend", reason="cffi (the pack and test extras) is not installed")
    coder = streams._literal_compressor(17)
    assert type(coder).__name__ == "_HuffmanOnly"
    repeated = np.tile(np.random.default_rng(1).integers(0, 16, 100, dtype=np.uint8), 1000)
    literal = coder.compress(repeated)
    assert len(literal) > len(repeated) * 0.45  # 4 bits a symbol: Huffman alone, no repeat found
    assert len(zstandard.ZstdCompressor(level=3).compress(repeated.tobytes())) < 2000
    plane = _exponent_plane(300_000)
    huffman, matching = coder.compress(plane), streams._matching_literals(17).compress(plane)
    assert len(huffman) < len(matching)
    reader = zstandard.ZstdDecompressor()
    assert reader.decompress(literal) == repeated.tobytes()
    assert reader.decompress(huffman) == plane.tobytes() and coder.compress(b"") != b""


def test_without_cffi_planes_are_coded_by_the_matching_coder(monkeypatch):
    """zstandard's C backend has no sequence API: without cffi the planes are coded as before, by
    zstd with matching all but off, and decode the same way."""
    import sys

    import zstandard

    # NOTE: `from zstandard import _cffi` then fails, as where cffi is not installed
    monkeypatch.setitem(sys.modules, "zstandard._cffi", None)
    monkeypatch.delattr(zstandard, "_cffi", raising=False)
    monkeypatch.setattr(streams._local, "literal_cctx", {}, raising=False)
    assert streams._huffman_only(17) is None
    plane = _exponent_plane(200_000, seed=2)
    tag, coded = streams.literal_pieces(plane, block_log=17, matching=False)
    assert type(streams._literal_compressor(17)).__name__ == "ZstdCompressor"
    assert (
        tag == bytes([streams.ZSTD]) and bytes(streams.decode_view(tag + coded)) == plane.tobytes()
    )


def test_a_zstandard_without_the_sequence_api_gets_the_matching_coder(monkeypatch):
    """An older zstandard whose CFFI backend lacks a name of the sequence API is probed once and
    passed over, not raised from in the middle of a pack."""

    def older_backend(self, backend, window_log):
        raise AttributeError("module has no attribute 'ZSTD_compressSequences'")

    monkeypatch.setattr(streams._HuffmanOnly, "__init__", older_backend)
    monkeypatch.setattr(streams._local, "literal_cctx", {}, raising=False)
    assert streams._huffman_only(17) is None
    assert type(streams._literal_compressor(17)).__name__ == "ZstdCompressor"


# -- splicing ---------------------------------------------------------------------------------------


def _branch(name: str, value: np.ndarray) -> onnx.GraphProto:
    """A subgraph holding a Constant tensor and an initializer of its own."""
    return helper.make_graph(
        [
            helper.make_node(
                "Constant", [], [f"{name}_c"], value=numpy_helper.from_array(value, f"{name}_cv")
            ),
            helper.make_node("Add", [f"{name}_c", f"{name}_w"], [f"{name}_out"]),
        ],
        name,
        [],
        [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, list(value.shape))],
        [numpy_helper.from_array(value * 2, f"{name}_w")],
    )


def _nested_model(seed: int = 0) -> onnx.ModelProto:
    """Initializers, Constant tensors, an If with a tensor-holding subgraph in each branch, a tensor
    with fields numbered above raw_data (doc_string), a tiny tensor and a typed-field tensor."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    doc = numpy_helper.from_array(rng.standard_normal((32,)).astype(np.float32), "b")
    doc.doc_string = "a tensor with a doc string (field 12, after raw_data)"
    typed = helper.make_tensor(
        "typed", TensorProto.FLOAT, [40], rng.standard_normal(40).astype(np.float32).tolist()
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["h2"]),
        helper.make_node(
            "Constant",
            [],
            ["k"],
            value=numpy_helper.from_array(rng.standard_normal((64,)).astype(np.float32), "kv"),
        ),
        helper.make_node("ReduceSum", ["k"], ["ks"], keepdims=0),
        helper.make_node("Greater", ["ks", "zero"], ["cond"]),
        helper.make_node(
            "If",
            ["cond"],
            ["branch"],
            then_branch=_branch("then", rng.standard_normal((4, 32)).astype(np.float32)),
            else_branch=_branch("else", rng.standard_normal((4, 32)).astype(np.float32)),
        ),
        helper.make_node("Add", ["typed", "typed"], ["t2"]),
        helper.make_node("Identity", ["h2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nested",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 32]),
            helper.make_tensor_value_info("t2", TensorProto.FLOAT, [40]),
            helper.make_tensor_value_info("branch", TensorProto.FLOAT, [4, 32]),
        ],
        [
            numpy_helper.from_array(w, "w"),
            doc,
            numpy_helper.from_array(np.float32(0), "zero"),
            typed,
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), chosen=st.sets(st.integers(0, 20)))
def test_splice_writes_what_the_protobuf_encoder_writes(tmp_path_factory, seed, chosen):
    """Clearing any subset of tensors' raw_data and splicing it back gives the encoder's bytes."""
    proto = _nested_model(seed)
    full = proto.SerializeToString()
    tensors = list(walk.tensors(proto))
    removed = {}
    for index, (_name, tensor) in enumerate(tensors):
        if index in chosen and tensor.HasField("raw_data"):
            removed[index] = tensor.raw_data
            tensor.ClearField("raw_data")
    graph = proto.SerializeToString()
    spans = packwire.tensor_spans(graph)
    assert spans is not None and len(spans) == len(tensors) == 9
    fills = {spans[i][0]: (len(data), lambda data=data: data) for i, data in removed.items()}
    path = tmp_path_factory.mktemp("splice") / "m.onnx"
    with open(path, "wb") as out:
        assert packwire.splice(graph, fills, out) == len(full)
    assert path.read_bytes() == full


def test_unpack_is_bit_exact_on_subgraphs_and_constants(tmp_path):
    proto = _nested_model()
    src = tmp_path / "nested.onnx"
    src.write_bytes(proto.SerializeToString())
    result = modelpress.pack(src, tmp_path / "n.mpk", solid=False)
    # w, b, the Constant kv, and each branch's initializer and Constant (not: the scalar, the typed-field tensor)
    assert result.bytes_identical and sorted(t.name for t in result.tensors) == [
        "b",
        "else_c",
        "else_w",
        "k",
        "then_c",
        "then_w",
        "w",
    ]
    assert (
        modelpress.unpack(tmp_path / "n.mpk", tmp_path / "back.onnx").read_bytes()
        == src.read_bytes()
    )
    session = (
        modelpress.make_session(tmp_path / "n.mpk") if hasattr(modelpress, "make_session") else None
    )
    if session is not None:
        x = np.ones((2, 64), np.float32)
        assert np.array_equal(
            session.run(None, {"x": x})[0],
            onnx.reference.ReferenceEvaluator(proto).run(None, {"x": x})[0],
        )


def test_unpack_falls_back_to_the_proto_where_the_walker_gives_up(
    digits_mlp_path, tmp_path, monkeypatch
):
    packed = modelpress.pack(digits_mlp_path, tmp_path / "m.mpk")
    monkeypatch.setattr(reader, "model_tensors", lambda graph: None)
    back = modelpress.unpack(packed.path, tmp_path / "back.onnx").read_bytes()
    assert back == digits_mlp_path.read_bytes()
    with reader.PackedModel(packed.path) as opened:
        assert all(t.span == (-1, -1) for t in opened.tensors().tensors)  # the parsed graph's


def test_a_solid_stream_is_decoded_once_while_its_members_are_written(tmp_path):
    from tests.test_pack import _int8_chain

    src = _int8_chain(tmp_path / "chain.onnx", layers=4)
    result = modelpress.pack(src, tmp_path / "c.mpk")
    assert result.solids, "the int8 chain packs its weights as a solid stream"
    calls = []
    with reader.PackedModel(result.path) as packed:
        original = packed._decode

        def counting(*args, **kwargs):
            calls.append(args[0])
            return original(*args, **kwargs)

        packed._decode = counting  # type: ignore[method-assign]
        reader._write_graph(packed, tmp_path / "back.onnx")
    assert (tmp_path / "back.onnx").read_bytes() == src.read_bytes()
    assert len(calls) == len(result.solids) + sum(1 for t in result.tensors if t.solid is None)


# -- the registry travels ---------------------------------------------------------------------------


class _NegatingCodec:
    """A codec only a custom registry has: stores the bitwise complement."""

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        def flip(data: bytes) -> bytes:
            return np.bitwise_not(np.frombuffer(data, np.uint8)).tobytes()

        register(
            Codec(
                "negate",
                lambda data, info: flip(data[:-1]) if data[-1:] == b"\0" else None,
                lambda blob, info: flip(blob) + b"\0",
                summary="test codec",
            )
        )


def test_load_decodes_a_pack_with_the_registry_it_was_given(tmp_path):
    raw = bytearray(np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32).tobytes())
    raw[-1] = 0  # the negate codec codes only data ending in a zero byte (one byte shorter)
    w = np.frombuffer(bytes(raw), np.float32).reshape(64, 32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    src = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    registry = modelpress.create_registry(plugins=[_NegatingCodec()])
    result = modelpress.pack(src, tmp_path / "m.mpk", codecs=["negate"], registry=registry)
    assert result.codec_counts() == {"negate": 1}
    model = modelpress.load(tmp_path / "m.mpk", registry=registry)
    assert model.ir.graph.initializers["w"].const_value.numpy().tobytes() == w.tobytes()
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"codec 'negate' .*which no installed plugin provides",
    ):
        modelpress.load(tmp_path / "m.mpk")  # the process-wide registry does not have it
    from modelpress.plugin.registry import current_registry, get_registry

    assert current_registry() is get_registry()  # the load's registry does not leak out of it
