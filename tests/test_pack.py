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
from modelpress.packing.codec_choice import encode_best
from modelpress.packing.container import PackedModel, tensor_report
from modelpress.plugin.codec import Codec, TensorInfo
from modelpress.runtime.session import make_session, run
from modelpress.testing import tiny_mlp
from tests.conftest import run_cli, run_cli_here

F32 = ir.DataType.FLOAT


def _codecs():
    return modelpress.get_registry().codecs()


def _edge_cases() -> list[tuple[str, ir.DataType, bytes, tuple[int, ...]]]:
    rng = np.random.default_rng(0)
    nan_payloads = np.array(
        [0x7FC00001, 0x7F800001, 0xFFC00000, 0x7F800000, 0xFF800000, 0x80000000, 0], np.uint32
    )
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
        (
            "fp16",
            ir.DataType.FLOAT16,
            rng.standard_normal(999).astype(np.float16).tobytes(),
            (999,),
        ),
        (
            "fp16-nan",
            ir.DataType.FLOAT16,
            np.array([0x7E01, 0xFC00, 0x7C00, 0x8000] * 40, np.uint16).tobytes(),
            (160,),
        ),
        (
            "bf16",
            ir.DataType.BFLOAT16,
            (rng.standard_normal(777).astype(np.float32).view(np.uint32) >> 16)
            .astype(np.uint16)
            .tobytes(),
            (777,),
        ),
        ("fp64", ir.DataType.DOUBLE, rng.standard_normal(300).tobytes(), (300,)),
        (
            "int8",
            ir.DataType.INT8,
            np.clip(rng.normal(0, 20, 4000), -128, 127).astype(np.int8).tobytes(),
            (4000,),
        ),
        (
            "uint8-indices",
            ir.DataType.UINT8,
            rng.integers(0, 16, 4001).astype(np.uint8).tobytes(),
            (4001,),
        ),
        (
            "uint8-sparse",
            ir.DataType.UINT8,
            np.where(rng.random(4000) < 0.95, 7, rng.integers(0, 16, 4000))
            .astype(np.uint8)
            .tobytes(),
            (4000,),
        ),
        (
            "int4-odd",
            ir.DataType.INT4,
            rng.integers(0, 256, 1000).astype(np.uint8).tobytes(),
            (1999,),
        ),
        (
            "uint4",
            ir.DataType.UINT4,
            rng.integers(0, 256, 1000).astype(np.uint8).tobytes(),
            (2000,),
        ),
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
        return encode_best(data, TensorInfo(name, dtype, shape), _codecs())

    assert best("normal")[0] == "bytegroup"
    codec, blob = best("sparse")
    assert codec == "sparse" and len(blob) < 0.12 * 20000  # ~10% of the values, each ~3.4 bytes
    codec, blob = best("codebook")
    assert codec == "codebook" and len(blob) < 3000 * 4 / 7  # about 4 bits per element
    assert best("zeros")[0] in ("sparse", "zstd", "lzma") and len(best("zeros")[1]) < 100


@settings(max_examples=30, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, 0.0, 0.0, 1.0, -2.5, float("nan"), float("inf"), 3e-39, 1e30]),
        max_size=400,
    ),
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
)
def test_random_sparse_and_special_values_round_trip(values, dtype):
    with np.errstate(over="ignore"):
        data = np.asarray(values, dtype=dtype).tobytes()
    info = TensorInfo("t", ir.DataType.from_numpy(np.dtype(dtype)), (len(values),))
    name, blob = encode_best(data, info, _codecs())
    codec = modelpress.get_registry().codec(name)
    assert (blob if codec is None else codec.decode(blob, info)) == data


# -- containers -----------------------------------------------------------------------------------


def _sha_of_tensors(path):
    proto = onnx.load(str(path))
    return {
        t.name: hashlib.sha256(numpy_helper.to_array(t).tobytes()).hexdigest()
        for t in proto.graph.initializer
    }


def _constant_weight_model(path):
    """Weights held in Constant nodes (as Paddle and some exporters write them), one sparse."""
    rng = np.random.default_rng(1)
    w = np.where(rng.random((16, 8)) < 0.8, 0, rng.standard_normal((16, 8))).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "w_value")),
        helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_pack_unpack_restores_the_file_bytes(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    result = modelpress.pack(digits_mlp_path, packed)
    assert (
        result.bytes_identical
        and packed.stat().st_size == result.size_bytes < digits_mlp_path.stat().st_size
    )
    assert {t.codec for t in result.tensors} <= {c.name for c in _codecs()} | {"stored"}
    out = modelpress.unpack(packed, tmp_path / "back.onnx")
    assert out.read_bytes() == digits_mlp_path.read_bytes()

    constant = _constant_weight_model(tmp_path / "const.onnx")
    result = modelpress.pack(constant, tmp_path / "const.mpk")
    assert [t.name for t in result.tensors] == ["w"] and result.tensors[0].codec == "sparse"
    assert (
        modelpress.unpack(tmp_path / "const.mpk", tmp_path / "const2.onnx").read_bytes()
        == constant.read_bytes()
    )


def test_load_and_session_from_a_pack_decode_in_memory(digits_mlp_path, digits, tmp_path):
    packed = tmp_path / "m.mpk"
    modelpress.pack(digits_mlp_path, packed)
    before = set(tmp_path.iterdir())
    model = modelpress.load(packed)
    assert (
        model.path == str(packed)
        and model.parameter_count() == modelpress.load(digits_mlp_path).parameter_count()
    )
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
    onnx.save(
        proto,
        src / "ext.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=256,
    )
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
    np.testing.assert_array_equal(
        run(make_session(packed), {"x": x})[0], run(make_session(src / "ext.onnx"), {"x": x})[0]
    )


def test_damaged_containers_are_named_and_leave_nothing(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    result = modelpress.pack(digits_mlp_path, packed)
    data = bytearray(packed.read_bytes())
    target = max(result.tensors, key=lambda t: t.size)
    flipped = bytearray(data)
    flipped[target.offset + target.size // 2] ^= 0xFF
    bad = tmp_path / "flipped.mpk"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(
        modelpress.InvalidModelError, match=rf"damaged modelpress pack: tensor '{target.name}'"
    ):
        modelpress.unpack(bad, tmp_path / "out.onnx")
    with pytest.raises(modelpress.InvalidModelError, match=rf"tensor '{target.name}'"):
        modelpress.load(bad)
    assert not (tmp_path / "out.onnx").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out")
    ]

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
    cli = run_cli_here("unpack", str(bad), "-o", str(tmp_path / "out.onnx"))
    assert (
        cli.returncode == 1
        and target.name in cli.stderr
        and len(cli.stderr.strip().splitlines()) == 1
    )


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

        register(
            Codec(
                "constant",
                encode,
                lambda blob, info: bytes(blob) * info.size,
                summary="all elements equal",
            )
        )


class _LyingCodec:
    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        register(
            Codec(
                "liar",
                lambda data, info: b"x",
                lambda blob, info: b"\0" * len(blob),
                summary="decodes wrongly",
            )
        )


def _filled_model(path):
    w = np.full((64, 32), 0.25, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_codec_from_a_plugin_is_used_and_required(tmp_path):
    model = _filled_model(tmp_path / "filled.onnx")
    registry = modelpress.create_registry(plugins=[_ConstantCodec(), _LyingCodec()])
    assert registry.codec("constant").plugin and registry.codec("bytegroup").plugin == "pack"
    builtin = registry.plugins["pack"]  # the built-in codecs come through the entry-point group
    assert builtin.builtin and {c.name for c in builtin.codecs} == {
        "bytegroup",
        "codebook",
        "sparse",
        "nibbles",
        "zstd",
        "lzma",
    }
    result = modelpress.pack(model, tmp_path / "f.mpk", registry=registry)
    assert result.tensors[0].codec == "constant" and result.tensors[0].size == 4
    assert "liar" in result.skipped_codecs  # tried, failed its check, never written
    assert (
        modelpress.unpack(
            tmp_path / "f.mpk", tmp_path / "back.onnx", registry=registry
        ).read_bytes()
        == model.read_bytes()
    )
    with pytest.raises(
        modelpress.PluginError, match=r"codec 'constant' .*which no installed plugin provides"
    ):
        modelpress.unpack(tmp_path / "f.mpk", tmp_path / "again.onnx")
    duplicate = modelpress.create_registry(plugins=[_ConstantCodec()])
    with pytest.raises(
        modelpress.DuplicateMethodError, match="codec 'constant' is registered by both"
    ):
        duplicate.register(_ConstantCodec(), name="another")
    with pytest.raises(
        modelpress.OptionsError, match="no installed plugin provides a codec 'nope'"
    ):
        modelpress.pack(model, tmp_path / "x.mpk", codecs=["nope"])


# -- inspect, CLI and recipes ---------------------------------------------------------------------


@pytest.mark.slow
def test_cli_pack_unpack_and_inspect_entropy(digits_mlp_path, tmp_path):
    packed = tmp_path / "m.mpk"
    out = run_cli("pack", str(digits_mlp_path), "-o", str(packed))
    assert out.returncode == 0, out.stderr
    assert "smaller" in out.stdout and packed.exists()
    back = tmp_path / "back.onnx"
    assert run_cli("unpack", str(packed), "-o", str(back)).returncode == 0
    assert back.read_bytes() == digits_mlp_path.read_bytes()
    options = run_cli(
        "pack",
        str(digits_mlp_path),
        "-o",
        str(tmp_path / "s.mpk"),
        "--strip",
        "--no-solid",
        "--prefer",
        "size",
    )
    assert options.returncode == 0, options.stderr
    with PackedModel(tmp_path / "s.mpk") as opened:
        assert opened.manifest["source"]["stripped"] and not opened.manifest["solids"]
    shown = run_cli("inspect", str(packed), "--entropy")
    assert (
        shown.returncode == 0
        and "fc0.weight" in shown.stdout
        and "order-0 entropy" in shown.stdout  # the title wraps to the table's width
    )
    rows = {r["name"]: r for r in tensor_report(modelpress.load(digits_mlp_path))}
    assert rows["fc0.weight"]["role"] == "weight" and rows["fc0.bias"]["role"] == "bias"
    assert 0 < rows["fc0.weight"]["entropy_bits"] <= 32 and rows["fc0.weight"]["ratio"] > 1


@pytest.mark.slow
def test_recipe_pack_stage_reports_packed_sizes(digits_mlp_path, digits_npz, tmp_path):
    recipe = {
        "passes": [
            {"kind": "prune", "method": "magnitude", "options": {"sparsity": 0.8}},
            {
                "kind": "quantize",
                "method": "codebook",
                "options": {"bits": 4, "min_elements": 64, "keep_zeros": True, "biases": True},
            },
        ],
        "data": {"eval": str(digits_npz)},
        "evaluate": {"metric": "accuracy", "repeats": 2, "batch_size": 8},
        "pack": {"codecs": "auto"},
    }
    out = tmp_path / "small.onnx"
    result = modelpress.compress(digits_mlp_path, recipe, output=out, show_progress=False)
    assert result.packed == out.with_suffix(".mpk") and result.packed.exists()
    assert all(s.packed_bytes and s.packed_bytes < s.size_bytes for s in result.stages)
    assert (
        result.stages[-1].packed_bytes
        < result.stages[1].packed_bytes
        < result.stages[0].packed_bytes
    )
    columns = result.report.columns()
    assert "packed size (MB)" in columns and "ratio (packed)" in columns
    assert "ratio (packed)" in (tmp_path / "report.md").read_text()
    report = json.loads((tmp_path / "report.json").read_text())
    stage_pack = Path(result.stages[-1].path).with_suffix(".mpk")
    assert report["stages"][-1]["packed_bytes"] == stage_pack.stat().st_size
    assert (
        abs(result.packed.stat().st_size - stage_pack.stat().st_size) < 64
    )  # same weights, other metadata
    with PackedModel(result.packed) as packed:
        assert {e.codec for e in packed.entries} & {"sparse", "codebook"}
    # Deep Compression's weight sharing: pruned weights stay exactly zero, biases are shared too
    pruned = {
        t.name: numpy_helper.to_array(t) for t in onnx.load(result.stages[1].path).graph.initializer
    }
    shared = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    table, idx = shared["fc0.weight_codebook"], shared["fc0.weight_indices"]
    assert table[0] == 0 and np.array_equal(idx == 0, pruned["fc0.weight"] == 0)
    assert (
        len(np.unique(table[idx])) <= 16
        and "fc0.bias_indices" in shared
        and "fc0.bias" not in shared
    )
    x = np.load(digits_npz)["x"][:16]
    np.testing.assert_array_equal(
        run(make_session(result.packed), {"x": x})[0], run(make_session(out), {"x": x})[0]
    )


# -- format 2: solid streams, decode speed, stripping, format 1 --------------------------------------


def _int8_chain(path, layers=4, seed=0):
    """MatMuls on int8 weights through DequantizeLinear; the weights repeat each other's rows (as
    the filters of one network resemble each other), which only a solid stream can see."""
    rng = np.random.default_rng(seed)
    base = np.clip(rng.normal(0, 12, (96, 96)), -127, 127).astype(np.int8)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        w = np.roll(base, i * 7, axis=0)
        w[rng.random(w.shape) < 0.05] = 0
        inits += [
            numpy_helper.from_array(w, f"w{i}_q"),
            numpy_helper.from_array(np.float32(0.01), f"s{i}"),
        ]
        nodes += [
            helper.make_node("DequantizeLinear", [f"w{i}_q", f"s{i}"], [f"w{i}"], name=f"dq{i}"),
            helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"], name=f"mm{i}"),
        ]
        current = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 96])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, [2, 96])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_solid_streams_code_similar_tensors_together(tmp_path):
    model = _int8_chain(tmp_path / "q.onnx")
    separate = modelpress.pack(model, tmp_path / "separate.mpk", solid=False)
    solid = modelpress.pack(model, tmp_path / "solid.mpk")
    assert not separate.solids and len(solid.solids) == 1 and solid.solids[0]["tensors"] == 4
    assert solid.size_bytes < 0.6 * separate.size_bytes  # the repeats across tensors are found
    members = [e for e in solid.tensors if e.solid == 0]
    assert [e.name for e in members] == ["w0_q", "w1_q", "w2_q", "w3_q"] and [
        e.at for e in members
    ] == [0, 9216, 18432, 27648]
    for packed in ("separate.mpk", "solid.mpk"):
        assert (
            modelpress.unpack(tmp_path / packed, tmp_path / "back.onnx").read_bytes()
            == model.read_bytes()
        )
    with PackedModel(
        tmp_path / "solid.mpk"
    ) as opened:  # the manifest's rows give the same entries back
        assert [(e.name, e.solid, e.at, e.offset, e.size, e.checksum) for e in opened.entries] == [
            (e.name, e.solid, e.at, e.offset, e.size, e.checksum) for e in members
        ]
    x = np.random.default_rng(1).standard_normal((2, 96)).astype(np.float32)
    np.testing.assert_array_equal(
        run(make_session(tmp_path / "solid.mpk"), {"x": x})[0],
        run(make_session(model), {"x": x})[0],
    )
    # damage inside the stream: the error names a tensor of it, and nothing is written
    data = bytearray((tmp_path / "solid.mpk").read_bytes())
    data[members[0].offset + members[0].size // 2] ^= 0x55
    (tmp_path / "bad.mpk").write_bytes(bytes(data))
    with pytest.raises(
        modelpress.InvalidModelError, match=r"damaged modelpress pack: tensor 'w\d_q'"
    ):
        modelpress.unpack(tmp_path / "bad.mpk", tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


class _SlowCodec:
    """A codec 5 % smaller than the best built-in one, but marked slow to decode."""

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        def encode(data, info):
            best = encode_best(data, info, [c for c in _codecs() if c.name == "bytegroup"])
            return (
                best[1][: int(len(best[1]) * 0.95)] + (b"" if best[0] == "bytegroup" else b"?")
                if best[0] == "bytegroup"
                else None
            )

        def decode(blob, info):
            return _full[bytes(blob)]

        _full: dict[bytes, bytes] = {}

        def remember(data, info):
            blob = encode(data, info)
            if blob is not None:
                _full[blob] = data
            return blob

        register(Codec("slow", remember, decode, summary="slow to decode", fast_decode=False))


def test_prefer_speed_takes_a_slow_codec_only_for_a_large_gain(digits_mlp_path, tmp_path):
    registry = modelpress.create_registry(plugins=[_SlowCodec()])
    fast = modelpress.pack(digits_mlp_path, tmp_path / "fast.mpk", registry=registry, solid=False)
    small = modelpress.pack(
        digits_mlp_path, tmp_path / "small.mpk", registry=registry, solid=False, prefer="size"
    )
    weights = {e.name: e.codec for e in fast.tensors}, {e.name: e.codec for e in small.tensors}
    assert weights[0]["fc0.weight"] == "bytegroup" and weights[1]["fc0.weight"] == "slow"
    assert small.size_bytes < fast.size_bytes
    with pytest.raises(modelpress.OptionsError, match="prefer must be"):
        modelpress.pack(digits_mlp_path, tmp_path / "x.mpk", prefer="fastest")


def test_strip_drops_metadata_but_not_computation(digits_mlp_path, tmp_path):
    model = modelpress.load(digits_mlp_path)
    proto = model.to_proto()
    noise = (
        np.random.default_rng(1).bytes(1500).hex()
    )  # NOTE: incompressible, so what strip saves shows through the codecs
    proto.doc_string = noise[:1000]
    onnx.helper.set_model_props(proto, {"provenance": noise[1000:]})
    proto.graph.value_info.append(
        helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["batch", 64])
    )
    for node in proto.graph.node:  # what torch.onnx writes on every node
        helper.set_metadata_props(
            node,
            {"pkg.torch.onnx.stack_trace": f"File model.py, line {len(node.name)}, in forward"},
        )
    helper.set_metadata_props(proto.graph.initializer[0], {"origin": "trained"})
    onnx.save(proto, tmp_path / "meta.onnx")
    kept = modelpress.pack(tmp_path / "meta.onnx", tmp_path / "kept.mpk")
    stripped = modelpress.pack(tmp_path / "meta.onnx", tmp_path / "stripped.mpk", strip=True)
    assert (
        stripped.size_bytes < kept.size_bytes - 1000 and stripped.source_bytes == kept.source_bytes
    )
    back = onnx.load(str(modelpress.unpack(tmp_path / "stripped.mpk", tmp_path / "back.onnx")))
    assert not back.metadata_props and not back.doc_string and not back.graph.value_info
    assert (
        not any(n.metadata_props for n in back.graph.node)
        and not back.graph.initializer[0].metadata_props
    )
    x = np.random.default_rng(0).random((8, 64), np.float32)
    np.testing.assert_array_equal(
        run(make_session(tmp_path / "back.onnx"), {"x": x})[0],
        run(make_session(digits_mlp_path), {"x": x})[0],
    )


def _as_format_1(packed_path, out_path):
    """Rewrite a format-2 pack as format 1 (full manifest rows, SHA-256s) the way version 1 wrote it."""
    import lzma
    import struct

    with PackedModel(packed_path) as packed:
        assert not packed.manifest["solids"]
        rows = []
        for e in packed.entries:
            data = packed.tensor_bytes(e)
            row = {
                "index": e.index,
                "name": e.name,
                "dtype": e.dtype,
                "shape": e.shape,
                "role": e.role,
                "codec": e.codec,
                "offset": e.offset,
                "size": e.size,
                "bytes": e.bytes,
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            rows.append(row)
        graph = packed._graph
        source = dict(packed.manifest["source"], sha256="0" * 64)
        manifest = {
            "format": "modelpress-pack/1",
            "source": source,
            "graph": {"size": len(graph), "sha256": hashlib.sha256(graph).hexdigest()},
            "codecs": packed.manifest["codecs"],
            "tensors": rows,
            "external_files": packed.manifest["external_files"],
        }
        body = bytes(
            packed._map[
                8 : min(e.offset for e in packed.entries) + sum(e.size for e in packed.entries)
            ]
        )
    text = json.dumps(manifest).encode()
    head = lzma.compress(
        struct.pack("<I", len(text)) + text + graph,
        format=lzma.FORMAT_RAW,
        filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}],
    )
    out_path.write_bytes(
        b"MPACK\x00\x01\x00"
        + body
        + head
        + struct.pack("<QQ8s", 8 + len(body), len(head), b"MPACKEND")
    )
    return out_path


def test_format_1_packs_still_read(digits_mlp_path, tmp_path):
    modelpress.pack(digits_mlp_path, tmp_path / "v2.mpk", solid=False)
    old = _as_format_1(tmp_path / "v2.mpk", tmp_path / "v1.mpk")
    with PackedModel(old) as packed:
        assert packed.version == 1 and len(packed.entries[0].checksum) == 64
    assert (
        modelpress.unpack(old, tmp_path / "back.onnx").read_bytes() == digits_mlp_path.read_bytes()
    )
    assert (
        modelpress.load(old).parameter_count() == modelpress.load(digits_mlp_path).parameter_count()
    )
    data = bytearray(old.read_bytes())
    data[20] ^= 0xFF  # inside the first tensor's blob: its SHA-256 catches it
    (tmp_path / "bad1.mpk").write_bytes(bytes(data))
    with pytest.raises(modelpress.InvalidModelError, match="damaged modelpress pack: tensor"):
        modelpress.unpack(tmp_path / "bad1.mpk", tmp_path / "out.onnx")


@pytest.mark.slow
def test_codebook_centroid_fine_tuning_trains_only_the_shared_values(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"][:600], "labels": digits["y_train"][:600]}
    plain = modelpress.apply(
        model, "codebook", kind="quantize", bits=2, min_elements=64, keep_zeros=True
    )
    tuned = modelpress.apply(
        model,
        "codebook",
        kind="quantize",
        bits=2,
        min_elements=64,
        keep_zeros=True,
        fine_tune_epochs=2,
        train=train,
        show_progress=False,
    )
    a = {k: v.const_value.numpy() for k, v in plain.ir.graph.initializers.items()}
    b = {k: v.const_value.numpy() for k, v in tuned.ir.graph.initializers.items()}
    changed = {k for k in a if not np.array_equal(a[k], b[k])}
    assert changed and all(k.endswith("_codebook") for k in changed)  # indices, biases: untouched
    for k in changed:
        assert b[k][0] == 0 and not np.signbit(b[k][0])  # the kept zero stays +0.0

    def loss(m):
        logits = run(make_session(m), {"x": digits["x_train"][:200]})[0].astype(np.float64)
        logits -= logits.max(1, keepdims=True)
        return float(
            np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(200), digits["y_train"][:200]])
        )

    assert loss(tuned) < loss(plain)  # the shared values moved to fit the data better
    with pytest.raises(
        modelpress.DataError,
        match=r"codebook needs training data \(option 'fine_tune_epochs' is set\)",
    ):
        modelpress.apply(
            model, "codebook", kind="quantize", bits=2, min_elements=64, fine_tune_epochs=1
        )
