"""Choosing a codec per tensor without coding every tensor with every codec: a large tensor is
coded in full only by the codec(s) estimated smallest (``Codec.estimate``, else a coded sample),
the same way for built-in and third-party codecs; and the fast bytegroup coder round-trips every
float bit pattern, across its cache-sized steps."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.packing.codec_choice import SAMPLE_BYTES, encode_best
from modelpress.plugin.codec import Codec, TensorInfo

_WIDTH = {ir.DataType.FLOAT: 4, ir.DataType.FLOAT16: 2, ir.DataType.BFLOAT16: 2}


class _Counting:
    """A plugin codec (zstd on the raw bytes, under another name) that records the size of every
    input it is asked to encode."""

    def __init__(self, with_estimate: bool = False) -> None:
        self.encoded: list[int] = []
        self.estimated: list[int] = []
        self.with_estimate = with_estimate

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        import zlib

        def encode(data, info):
            self.encoded.append(len(data))
            return zlib.compress(data, 1)

        def estimate(data, info):
            self.estimated.append(len(data))
            return len(data)  # "no gain": never the best

        register(
            Codec(
                "counting",
                encode,
                lambda blob, info: zlib.decompress(blob),
                summary="zlib -1, counted",
                estimate=estimate if self.with_estimate else None,
            )
        )


def _weights_model(path, n=96 * 1024):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n // 256, 256)) * 0.02).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n // 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path, w.tobytes()


@pytest.mark.parametrize("with_estimate", [False, True], ids=["sampled", "own-estimate"])
def test_a_large_tensor_is_coded_in_full_only_by_the_codec_estimated_best(tmp_path, with_estimate):
    model, data = _weights_model(tmp_path / "w.onnx")
    plugin = _Counting(with_estimate)
    registry = modelpress.create_registry(plugins=[plugin])
    result = modelpress.pack(model, tmp_path / "w.mpk", registry=registry, solid=False)
    assert result.tensors[0].codec == "bytegroup"
    if (
        with_estimate
    ):  # its own estimate was asked (once, on the whole tensor), and it never coded anything
        assert plugin.estimated == [len(data)] and plugin.encoded == []
    else:  # it coded a sample of the 384 KiB tensor, never the tensor
        assert plugin.encoded and max(plugin.encoded) <= SAMPLE_BYTES < len(data)
    assert (
        modelpress.unpack(
            tmp_path / "w.mpk", tmp_path / "back.onnx", registry=registry
        ).read_bytes()
        == model.read_bytes()
    )


def test_a_plugin_codec_estimated_best_wins_on_equal_terms(tmp_path):
    """Constant weights: the plugin's tiny blob is estimated (from a sample) smaller than every
    built-in codec's, so it is coded in full and chosen."""
    w = np.full((256, 256), 0.25, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 256])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "c.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)

    class Constant:
        @modelpress.hookimpl
        def modelpress_register_codecs(self, register):
            def encode(data, info):
                return data[:4] if data == data[:4] * (len(data) // 4) else None

            register(Codec("constant", encode, lambda blob, info: bytes(blob) * info.size))

    registry = modelpress.create_registry(plugins=[Constant()])
    result = modelpress.pack(path, tmp_path / "c.mpk", registry=registry)
    assert result.tensors[0].codec == "constant" and result.tensors[0].size == 4
    assert (
        modelpress.unpack(
            tmp_path / "c.mpk", tmp_path / "back.onnx", registry=registry
        ).read_bytes()
        == path.read_bytes()
    )


def test_a_codec_that_does_not_decode_bit_exactly_is_passed_over_for_the_next_estimate():
    data = (np.random.default_rng(1).standard_normal(64 * 1024) * 0.02).astype(np.float32).tobytes()
    info = TensorInfo("w", ir.DataType.FLOAT, (64 * 1024,), "weight")
    liar = Codec(
        "liar", lambda d, i: d[: len(d) // 8], lambda b, i: bytes(len(b) * 8)
    )  # estimated best, decodes zeros
    registry = modelpress.get_registry()
    skipped: dict[str, str] = {}
    name, blob = encode_best(data, info, [liar, *registry.codecs()], skipped)
    assert name == "bytegroup" and "liar" in skipped
    assert bytes(registry.codec("bytegroup").decode(blob, info)) == data


def _floats(dtype: ir.DataType, count: int, kind: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    width = _WIDTH[dtype]
    if kind == "random-bits":
        return rng.integers(0, 256, count * width, dtype=np.uint8).tobytes()
    if kind == "denormals":  # exponent all zero, sign and mantissa random
        bits = rng.integers(0, 2 ** (8 * width), count, dtype=np.uint64).astype(f"<u{width}")
        keep = (1 << (23 if width == 4 else 10 if dtype == ir.DataType.FLOAT16 else 7)) - 1
        return (bits & np.array(keep | (1 << (8 * width - 1)), f"<u{width}")).tobytes()
    values = (rng.standard_normal(count) * 0.02).astype(np.float32)
    specials = np.array([np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-45, 1e-39], np.float32)
    mask = rng.random(count) < 0.05
    values[mask] = rng.choice(specials, int(mask.sum()))
    if dtype == ir.DataType.FLOAT:
        return values.tobytes()
    if dtype == ir.DataType.FLOAT16:
        return values.astype(np.float16).tobytes()
    return (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()


@settings(max_examples=40, deadline=None)
@given(
    dtype=st.sampled_from(list(_WIDTH)),
    count=st.one_of(st.integers(1, 300), st.integers(131_000, 270_000)),
    kind=st.sampled_from(["random-bits", "weights-with-specials", "denormals"]),
    seed=st.integers(0, 2**16),
)
def test_bytegroup_is_bit_exact_across_its_steps(dtype, count, kind, seed):
    """float32/float16/bfloat16 with NaN payloads, infinities, -0 and denormals, at lengths on
    both sides of the decoder's 512 KiB step (131072 4-byte or 262144 2-byte elements); through
    the packer's own check too."""
    data = _floats(dtype, count, kind, seed)
    info = TensorInfo("t", dtype, (count,))
    codec = modelpress.get_registry().codec("bytegroup")
    blob = codec.encode(data, info)
    assert blob is not None and bytes(codec.decode(blob, info)) == data
    name, best = encode_best(data, info, [codec])
    assert name in ("bytegroup", "stored") and (
        name == "stored" or bytes(codec.decode(best, info)) == data
    )


def test_a_large_stream_is_coded_by_lzma_only_where_a_sample_says_it_may_win(monkeypatch):
    from modelpress.plugins.pack import streams

    rng = np.random.default_rng(3)
    coded: list[int] = []
    real = streams.lzma_encode
    monkeypatch.setattr(streams, "lzma_encode", lambda data: coded.append(len(data)) or real(data))
    # NOTE: "large" is above LZMA_SAMPLE (1 MiB); a lower threshold takes the same path on 512 KiB
    monkeypatch.setattr(streams, "LZMA_SAMPLE", 256 << 10)
    skewed = (
        (rng.random(512 << 10) < 0.03).astype(np.uint8).tobytes()
    )  # LZMA's range coder beats Huffman's 1 bit/byte floor
    blob = streams.encode(skewed)
    assert blob[0] == streams.LZMA and streams.decode(blob) == skewed and max(coded) == len(skewed)
    coded.clear()
    noise = rng.integers(0, 256, 512 << 10, dtype=np.uint8).tobytes()
    blob = streams.encode(noise)
    assert (
        blob[0] != streams.LZMA
        and streams.decode(blob) == noise
        and coded
        and max(coded) <= 64 << 10
    )
