"""Lossless packing: every codec round-trips bit-exactly, .mpk containers restore files exactly,
damage is named, codecs come from plugins, and recipes end with a pack stage."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.codecs import Codec, TensorInfo
from modelpress.packing import PackedModel, tensor_report
from modelpress.runtime import make_session, run
from modelpress.testing import tiny_mlp
from tests.conftest import run_cli

F32 = ir.DataType.FLOAT


def _codecs():
    return modelpress.get_registry().codecs()


def _edge_cases() -> list[tuple[str, ir.DataType, bytes, tuple[int, ...]]]:
    rng = np.random.default_rng(0)
    nan_payloads = np.array([0x7FC00001, 0x7F800001, 0xFFC00000, 0x7F800000, 0xFF800000, 0x80000000, 0], np.uint32)
    sparse = np.where(rng.random(5000) < 0.9, 0, rng.standard_normal(5000)).astype(np.float32)
    codebook = rng.choice(rng.standard_normal(16).astype(np.float32), size=3000)
    cases = [
        ("empty", F32, b"", (0,)),
        ("empty-2d", F32, b"", (3, 0)),
        ("one", F32, np.float32(1.5).tobytes(), (1,)),
        ("zeros", F32, np.zeros(4096, np.float32).tobytes(), (64, 64)),
        ("nan-inf-payloads", F32, np.tile(nan_payloads, 50).tobytes(), (350,)),
        ("normal", F32, rng.standard_normal(10000).astype(np.float32).tobytes(), (100, 100)),
        ("sparse", F32, sparse.tobytes(), (50, 100)),
        ("sparse-long-gaps", F32, np.eye(300, dtype=np.float32).tobytes(), (300, 300)),
        ("codebook", F32, codebook.tobytes(), (3000,)),
        ("fp16", ir.DataType.FLOAT16, rng.standard_normal(999).astype(np.float16).tobytes(), (999,)),
        ("fp16-nan", ir.DataType.FLOAT16, np.array([0x7E01, 0xFC00, 0x7C00, 0x8000] * 40, np.uint16).tobytes(), (160,)),
        ("bf16", ir.DataType.BFLOAT16, (rng.standard_normal(777).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(), (777,)),
        ("fp64", ir.DataType.DOUBLE, rng.standard_normal(300).tobytes(), (300,)),
        ("int8", ir.DataType.INT8, np.clip(rng.normal(0, 20, 4000), -128, 127).astype(np.int8).tobytes(), (4000,)),
        ("uint8-indices", ir.DataType.UINT8, rng.integers(0, 16, 4001).astype(np.uint8).tobytes(), (4001,)),
        ("uint8-sparse", ir.DataType.UINT8, np.where(rng.random(4000) < 0.95, 7, rng.integers(0, 16, 4000)).astype(np.uint8).tobytes(), (4000,)),
        ("int4-odd", ir.DataType.INT4, rng.integers(0, 256, 1000).astype(np.uint8).tobytes(), (1999,)),
        ("uint4", ir.DataType.UINT4, rng.integers(0, 256, 1000).astype(np.uint8).tobytes(), (2000,)),
        ("int64", ir.DataType.INT64, np.arange(-50, 50, dtype=np.int64).tobytes(), (100,)),
    ]
    return cases


@pytest.mark.parametrize("case", _edge_cases(), ids=lambda c: c[0])
def test_every_codec_round_trips_bit_exactly(case):
    name, dtype, data, shape = case
    info = TensorInfo(name, dtype, shape)
    tried = 0
    for codec in _codecs():
        if not codec.applies(info):
            continue
        blob = codec.encode(data, info)
        if blob is None:
            continue
        tried += 1
        assert codec.decode(blob, info) == data, codec.name
    # the general-purpose coders take anything non-empty
    assert tried >= (2 if data else 0)


def test_codecs_win_where_they_should():
    """The specialised codecs beat the general ones on the data they are made for."""
    by_case = {c[0]: c for c in _edge_cases()}

    def best(case):
        name, dtype, data, shape = by_case[case]
        return modelpress.packing.encode_best(data, TensorInfo(name, dtype, shape), _codecs())

    assert best("normal")[0] == "bytegroup"
    codec, blob = best("sparse")
    assert codec == "sparse" and len(blob) < 0.12 * 20000  # ~10% of the values, each ~3.4 bytes
    codec, blob = best("codebook")
    assert codec == "codebook" and len(blob) < 3000 * 4 / 7  # about 4 bits per element
    assert best("zeros")[0] in ("sparse", "zstd", "lzma") and len(best("zeros")[1]) < 100


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.0, -2.5, float("nan"), float("inf"), 3e-39, 1e30]), max_size=400),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
)
def test_random_sparse_and_special_values_round_trip(values, dtype):
    with np.errstate(over="ignore"):
        data = np.asarray(values, dtype=dtype).tobytes()
    info = TensorInfo("t", ir.DataType.from_numpy(np.dtype(dtype)), (len(values),))
    name, blob = modelpress.packing.encode_best(data, info, _codecs())
    codec = modelpress.get_registry().codec(name)
    assert (blob if codec is None else codec.decode(blob, info)) == data


# -- containers -----------------------------------------------------------------------------------


def _sha_of_tensors(path):
    proto = onnx.load(str(path))
    return {t.name: hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest() for t in proto.graph.initializer}


def _constant_weight_model(path):
    """Weights held in Constant nodes (as Paddle and some exporters write them), one sparse."""
    rng = np.random.default_rng(1)
    w = np.where(rng.random((16, 8)) < 0.8, 0, rng.standard_normal((16, 8))).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_pack_unpack_restores_the_file_bytes(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    result = modelpress.pack(digits_mlp_path, packed)
    assert result.bytes_identical and packed.stat().st_size == result.size_bytes < digits_mlp_path.stat().st_size
    assert {t.codec for t in result.tensors} <= {c.name for c in _codecs()} | {"stored"}
    out = modelpress.unpack(packed, tmp_path / "back.onnx")
    assert out.read_bytes() == digits_mlp_path.read_bytes()

    constant = _constant_weight_model(tmp_path / "const.onnx")
    result = modelpress.pack(constant, tmp_path / "const.mpk")
    assert [t.name for t in result.tensors] == ["w"] and result.tensors[0].codec == "sparse"
    assert modelpress.unpack(tmp_path / "const.mpk", tmp_path / "const2.onnx").read_bytes() == constant.read_bytes()


def test_load_and_session_from_a_pack_decode_in_memory(digits_mlp_path, digits, tmp_path):
    packed = tmp_path / "m.mpk"
    modelpress.pack(digits_mlp_path, packed)
    before = set(tmp_path.iterdir())
    model = modelpress.load(packed)
    assert model.path == str(packed) and model.parameter_count() == modelpress.load(digits_mlp_path).parameter_count()
    feeds = {"x": digits["x_test"][:32]}
    expected = run(make_session(digits_mlp_path), feeds)[0]
    np.testing.assert_array_equal(run(make_session(model), feeds)[0], expected)
    np.testing.assert_array_equal(run(make_session(packed), feeds)[0], expected)
    assert set(tmp_path.iterdir()) == before  # no ONNX was written to decode it


def test_external_data_models_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    model = tiny_mlp(in_features=64, hidden=128, classes=10)
    proto = model.to_proto()
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(proto, src / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=256)
    assert (src / "ext.onnx.data").exists()
    packed = tmp_path / "ext.mpk"
    result = modelpress.pack(src / "ext.onnx", packed)
    assert any(t.external for t in result.tensors)
    dest = tmp_path / "dest"
    dest.mkdir()
    modelpress.unpack(packed, dest / "ext.onnx")
    assert (dest / "ext.onnx").read_bytes() == (src / "ext.onnx").read_bytes()
    assert (dest / "ext.onnx.data").read_bytes() == (src / "ext.onnx.data").read_bytes()
    x = rng.standard_normal((4, 64)).astype(np.float32)
    np.testing.assert_array_equal(run(make_session(packed), {"x": x})[0], run(make_session(src / "ext.onnx"), {"x": x})[0])


def test_damaged_containers_are_named_and_leave_nothing(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    result = modelpress.pack(digits_mlp_path, packed)
    data = bytearray(packed.read_bytes())
    target = max(result.tensors, key=lambda t: t.size)
    flipped = bytearray(data)
    flipped[target.offset + target.size // 2] ^= 0xFF
    bad = tmp_path / "flipped.mpk"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(modelpress.InvalidModelError, match=rf"damaged modelpress pack: tensor '{target.name}'"):
        modelpress.unpack(bad, tmp_path / "out.onnx")
    with pytest.raises(modelpress.InvalidModelError, match=rf"tensor '{target.name}'"):
        modelpress.load(bad)
    assert not (tmp_path / "out.onnx").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]

    truncated = tmp_path / "truncated.mpk"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(modelpress.InvalidModelError, match="damaged modelpress pack"):
        modelpress.unpack(truncated, tmp_path / "out.onnx")
    manifest = tmp_path / "manifest.mpk"
    broken = bytearray(data)
    broken[-30] ^= 0xFF  # inside the manifest
    manifest.write_bytes(bytes(broken))
    with pytest.raises(modelpress.InvalidModelError, match="damaged modelpress pack"):
        modelpress.unpack(manifest, tmp_path / "out.onnx")
    with pytest.raises(modelpress.InvalidModelError, match="not a modelpress pack"):
        modelpress.unpack(digits_mlp_path, tmp_path / "out.onnx")
    cli = run_cli("unpack", str(bad), "-o", str(tmp_path / "out.onnx"))
    assert cli.returncode == 1 and target.name in cli.stderr and len(cli.stderr.strip().splitlines()) == 1


# -- codec plugins --------------------------------------------------------------------------------


class _ConstantCodec:
    """A third-party codec: a tensor whose elements are all equal becomes one element."""

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        def encode(data, info):
            width = info.dtype.bitwidth // 8 if info.dtype.bitwidth >= 8 else 0
            if not width or not data or data != data[:width] * (len(data) // width):
                return None
            return data[:width]

        register(Codec("constant", encode, lambda blob, info: bytes(blob) * info.size, summary="all elements equal"))


class _LyingCodec:
    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        register(Codec("liar", lambda data, info: b"x", lambda blob, info: b"\0" * len(blob), summary="decodes wrongly"))


def _filled_model(path):
    w = np.full((64, 32), 0.25, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])], [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_codec_from_a_plugin_is_used_and_required(tmp_path):
    model = _filled_model(tmp_path / "filled.onnx")
    registry = modelpress.create_registry(plugins=[_ConstantCodec(), _LyingCodec()])
    assert registry.codec("constant").plugin and registry.codec("bytegroup").plugin == "pack"
    builtin = registry.plugins["pack"]  # the built-in codecs come through the entry-point group
    assert builtin.builtin and {c.name for c in builtin.codecs} == {"bytegroup", "codebook", "sparse", "nibbles", "zstd", "lzma"}
    result = modelpress.pack(model, tmp_path / "f.mpk", registry=registry)
    assert result.tensors[0].codec == "constant" and result.tensors[0].size == 4
    assert "liar" in result.skipped_codecs  # tried, failed its check, never written
    assert modelpress.unpack(tmp_path / "f.mpk", tmp_path / "back.onnx", registry=registry).read_bytes() == model.read_bytes()
    with pytest.raises(modelpress.PluginError, match=r"codec 'constant' .*which no installed plugin provides"):
        modelpress.unpack(tmp_path / "f.mpk", tmp_path / "again.onnx")
    duplicate = modelpress.create_registry(plugins=[_ConstantCodec()])
    with pytest.raises(modelpress.DuplicateMethodError, match="codec 'constant' is registered by both"):
        duplicate.register(_ConstantCodec(), name="another")
    with pytest.raises(modelpress.OptionsError, match="no installed plugin provides a codec 'nope'"):
        modelpress.pack(model, tmp_path / "x.mpk", codecs=["nope"])


# -- inspect, CLI and recipes ---------------------------------------------------------------------


def test_cli_pack_unpack_and_inspect_entropy(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    out = run_cli("pack", str(digits_mlp_path), "-o", str(packed))
    assert out.returncode == 0, out.stderr
    assert "smaller" in out.stdout and packed.exists()
    back = tmp_path / "back.onnx"
    assert run_cli("unpack", str(packed), "-o", str(back)).returncode == 0
    assert back.read_bytes() == digits_mlp_path.read_bytes()
    shown = run_cli("inspect", str(packed), "--entropy")
    assert shown.returncode == 0 and "fc0.weight" in shown.stdout and "best codec" in shown.stdout
    rows = {r["name"]: r for r in tensor_report(modelpress.load(digits_mlp_path))}
    assert rows["fc0.weight"]["role"] == "weight" and rows["fc0.bias"]["role"] == "bias"
    assert 0 < rows["fc0.weight"]["entropy_bits"] <= 32 and rows["fc0.weight"]["ratio"] > 1


def test_recipe_pack_stage_reports_packed_sizes(digits_mlp_path, digits_npz, tmp_path):
    recipe = {
        "passes": [
            {"kind": "prune", "method": "magnitude", "options": {"sparsity": 0.8}},
            {"kind": "quantize", "method": "codebook", "options": {"bits": 4, "min_elements": 64, "keep_zeros": True, "biases": True}},
        ],
        "data": {"eval": str(digits_npz)},
        "evaluate": {"metric": "accuracy", "repeats": 2, "batch_size": 8},
        "pack": {"codecs": "auto"},
    }
    out = tmp_path / "small.onnx"
    result = modelpress.compress(digits_mlp_path, recipe, output=out, show_progress=False)
    assert result.packed == out.with_suffix(".mpk") and result.packed.exists()
    assert all(s.packed_bytes and s.packed_bytes < s.size_bytes for s in result.stages)
    assert result.stages[-1].packed_bytes < result.stages[1].packed_bytes < result.stages[0].packed_bytes
    columns = result.report.columns()
    assert "packed size (MB)" in columns and "ratio (packed)" in columns
    assert "ratio (packed)" in (tmp_path / "report.md").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    stage_pack = Path(result.stages[-1].path).with_suffix(".mpk")
    assert report["stages"][-1]["packed_bytes"] == stage_pack.stat().st_size
    assert abs(result.packed.stat().st_size - stage_pack.stat().st_size) < 64  # same weights, other metadata
    with PackedModel(result.packed) as packed:
        assert {e.codec for e in packed.entries} & {"sparse", "codebook"}
    # Deep Compression's weight sharing: pruned weights stay exactly zero, biases are shared too
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(result.stages[1].path).graph.initializer}
    shared = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    table, idx = shared["fc0.weight_codebook"], shared["fc0.weight_indices"]
    assert table[0] == 0 and np.array_equal(idx == 0, pruned["fc0.weight"] == 0)
    assert len(np.unique(table[idx])) <= 16 and "fc0.bias_indices" in shared and "fc0.bias" not in shared
    x = np.load(digits_npz)["x"][:16]
    np.testing.assert_array_equal(run(make_session(result.packed), {"x": x})[0], run(make_session(out), {"x": x})[0])
