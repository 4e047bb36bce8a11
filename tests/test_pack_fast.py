"""What keeps packing at ZipNN's speed without giving up its checks: format 3's XXH3-64 checksums
(CRC-32 without ``xxhash``; formats 1 and 2 still read), weights cut out of the wire bytes before
parsing and handed to codecs that take views without a copy, codecs that lost clearly on the first
tensors of a kind left out for the rest, and noise planes stored without coding them whole."""

from __future__ import annotations

import io
import sys

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.packing import walk, wire
from modelpress.packing.codec_choice import LEARN
from modelpress.packing.format import MAGIC, MIN_PACKED_BYTES
from modelpress.packing.reader import PackedModel
from modelpress.plugin.codec import Codec
from modelpress.plugins.pack import streams
from tests.test_pack_wire import models


def _layers_model(path, layers=8, rows=96, pruned=()):
    """``layers`` MatMuls with float weights large enough (36 KB) to be estimated rather than
    coded whole by every codec, and a bias each; the weights of layers in ``pruned`` 90 % zeros."""
    rng = np.random.default_rng(3)
    inits, nodes, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((rows, rows)) * 0.05).astype(np.float32)
        if i in pruned:
            w[rng.random(w.shape) < 0.9] = 0
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(w[0] * 0.1, f"b{i}")]
        nodes += [
            helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [f"y{i}"]),
        ]
        x = f"y{i}"
    graph = helper.make_graph(
        nodes,
        "layers",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, rows])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, rows])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_new_pack_is_format_3_checked_by_xxh3(tmp_path):
    pytest.importorskip("xxhash")
    src = _layers_model(tmp_path / "m.onnx")
    modelpress.pack(src, tmp_path / "m.mpk")
    assert (tmp_path / "m.mpk").read_bytes()[:8] == MAGIC == b"MPACK\x00\x03\x00"
    with PackedModel(tmp_path / "m.mpk") as packed:
        assert packed.version == 3 and packed.manifest["checksum"] == "xxh3-64"
        assert all(len(e.checksum) == 16 for e in packed.entries)
    back = modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")
    assert back.read_bytes() == src.read_bytes()


def test_without_xxhash_a_pack_is_checked_by_crc32(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xxhash", None)  # NOTE: `import xxhash` raises ImportError
    src = _layers_model(tmp_path / "m.onnx")
    modelpress.pack(src, tmp_path / "m.mpk")
    with PackedModel(tmp_path / "m.mpk") as packed:
        assert packed.manifest["checksum"] == "crc32"
        assert all(len(e.checksum) == 8 for e in packed.entries)
    back = modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")
    assert back.read_bytes() == src.read_bytes()


def test_an_xxh3_pack_without_xxhash_names_the_extra_to_install(tmp_path, monkeypatch):
    pytest.importorskip("xxhash")
    modelpress.pack(_layers_model(tmp_path / "m.onnx"), tmp_path / "m.mpk")
    monkeypatch.setitem(sys.modules, "xxhash", None)
    with pytest.raises(modelpress.PluginError, match=r"XXH3-64; install the pack extra"):
        modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")


def test_a_damaged_tensor_of_a_format_3_pack_is_named(tmp_path):
    src = _layers_model(tmp_path / "m.onnx")
    modelpress.pack(src, tmp_path / "m.mpk", solid=False)
    with PackedModel(tmp_path / "m.mpk") as packed:
        entry = next(e for e in packed.entries if e.name == "w3")
    data = bytearray((tmp_path / "m.mpk").read_bytes())
    data[entry.offset + entry.size - 1] ^= 0x40  # NOTE: the last byte: a stored mantissa plane
    (tmp_path / "m.mpk").write_bytes(bytes(data))
    with pytest.raises(modelpress.InvalidModelError, match=r"'w3'"):
        modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")
    assert not (tmp_path / "back.onnx").exists()


class _Spy:
    """A plugin codec that loses on every tensor (zlib at level 1 on float noise) and records,
    per call, the tensor and the type of what it was given."""

    def __init__(self, views: bool, level: int = 1) -> None:
        self.views, self.level = views, level
        self.encoded: list[tuple[str, type]] = []
        self.decoded: list[type] = []

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        import zlib

        def encode(data, info):
            self.encoded.append((info.name, type(data)))
            return zlib.compress(data, self.level)

        def decode(blob, info):
            self.decoded.append(type(blob))
            return zlib.decompress(blob)

        register(Codec("spy", encode, decode, summary="zlib, watched", views=self.views))


def test_a_codec_that_lost_on_the_first_tensors_of_a_kind_is_not_tried_on_the_rest(tmp_path):
    spy = _Spy(views=False, level=0)  # NOTE: zlib level 0 stores: larger than the tensor
    registry = modelpress.create_registry(plugins=[spy])
    src = _layers_model(tmp_path / "m.onnx", layers=10)
    result = modelpress.pack(src, tmp_path / "m.mpk", registry=registry, solid=False)
    weights = [n for n, _t in spy.encoded if n.startswith("w")]
    biases = [n for n, _t in spy.encoded if n.startswith("b")]
    # NOTE: the weights (float, "weight", large: estimated on a sample) and the biases (float,
    # "other", small: coded whole) are two kinds; the spy lost on the first LEARN of each
    assert weights == [f"w{i}" for i in range(LEARN)] and biases == [f"b{i}" for i in range(LEARN)]
    assert {e.codec for e in result.tensors if e.name.startswith("w")} == {"bytegroup"}
    back = modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx", registry=registry)
    assert back.read_bytes() == src.read_bytes()


def test_a_codec_that_takes_views_gets_the_files_bytes_uncopied_and_one_that_does_not_gets_bytes(
    tmp_path,
):
    for views in (True, False):
        spy = _Spy(views)
        registry = modelpress.create_registry(plugins=[spy])
        src = _layers_model(tmp_path / f"m{views}.onnx", layers=2)
        modelpress.pack(src, tmp_path / f"m{views}.mpk", codecs=["spy"], registry=registry)
        full = [t for n, t in spy.encoded if n == "w0"]  # coded in full: the tensor itself
        assert full and full[-1] is (memoryview if views else bytes)
        before = len(spy.decoded)
        modelpress.unpack(
            tmp_path / f"m{views}.mpk", tmp_path / f"b{views}.onnx", registry=registry
        )
        assert len(spy.decoded) > before
        assert set(spy.decoded[before:]) == {memoryview if views else bytes}
        assert (tmp_path / f"b{views}.onnx").read_bytes() == src.read_bytes()


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(model=models())
def test_cutting_the_weights_out_of_the_wire_bytes_is_what_clearing_them_does(model):
    """:func:`wire.cut` gives the bytes the encoder writes for the model with every ``raw_data``
    of at least ``MIN_PACKED_BYTES`` cleared, and where each one was; splicing them back gives
    the original bytes."""
    full = model.SerializeToString()
    found = list(walk.tensors(model))
    cut = wire.cut(full, MIN_PACKED_BYTES)
    assert cut is not None
    stripped, raws = cut
    expected = {}
    for index, (_name, tensor) in enumerate(found):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= MIN_PACKED_BYTES:
            expected[index] = tensor.raw_data
            tensor.ClearField("raw_data")
    assert stripped == model.SerializeToString()
    assert {i: full[a:b] for i, (a, b) in raws.items()} == expected
    spans = wire.tensor_spans(stripped)
    assert spans is not None
    fills = {spans[i][0]: (len(raw), lambda raw=raw: raw) for i, raw in expected.items()}
    out = io.BytesIO()
    wire.splice(stripped, fills, out)
    assert out.getvalue() == full


def test_a_noise_plane_is_stored_without_coding_it_whole_and_a_skewed_one_is_coded(monkeypatch):
    pytest.importorskip("zstandard")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, 1 << 20, dtype=np.uint8)
    skewed = np.minimum(rng.geometric(0.3, 1 << 20), 255).astype(np.uint8)
    calls: list[int] = []
    real = streams._literal_compressor

    def counted(block_log):
        cctx = real(block_log)

        class Counted:
            def compress(self, data):
                calls.append(len(memoryview(data)))
                return cctx.compress(data)

        return Counted()

    monkeypatch.setattr(streams, "_literal_compressor", counted)
    tag, _payload = streams.literal_pieces(noise, block_log=14)
    assert tag == bytes([streams.STORED]) and max(calls) == streams.NOISE_SAMPLE
    calls.clear()
    tag, payload = streams.literal_pieces(skewed, block_log=14, matching=False)
    assert tag == bytes([streams.ZSTD]) and len(payload) < 0.5 * skewed.size
    assert max(calls) == skewed.size  # judged on the sample, then coded whole
    assert bytes(streams.decode_view(tag + payload)) == skewed.tobytes()


def test_a_pruned_layer_after_dense_ones_of_the_same_role_still_gets_the_sparse_codec(tmp_path):
    """The sparse codec loses on the dense weights first; the pruned ones are a kind of their own
    (a quarter or more zeros in a sample), so it is tried, and wins, there."""
    src = _layers_model(tmp_path / "m.onnx", layers=9, pruned=(6, 7, 8))
    result = modelpress.pack(src, tmp_path / "m.mpk", solid=False)
    codecs = {e.name: e.codec for e in result.tensors if e.name.startswith("w")}
    assert [codecs[f"w{i}"] for i in range(9)] == ["bytegroup"] * 6 + ["sparse"] * 3
    back = modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")
    assert back.read_bytes() == src.read_bytes()
