"""`inspect` of a plain .onnx file reads it with the light wire-format reader (no onnx, onnx-ir or
plugins imported, issue #25) and shows exactly what loading the model shows: the same JSON and the
same tables, on real models; anything the reader cannot answer goes through the full load."""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

import modelpress
from modelpress.app.describe import describe
from modelpress.cli.inspect import _print_layers, _print_signature, _print_summary, light_info
from modelpress.io.onnx_view import CannotAnswer, read_onnx
from tests.test_inspect_layers import _lstm_file


def _args(path, *, no_normalize: bool = False) -> argparse.Namespace:
    return argparse.Namespace(
        model=str(path), sample=None, entropy=False, task=None, no_normalize=no_normalize
    )


def _tables(info) -> str:
    out = Console(record=True, width=120, file=io.StringIO())
    _print_summary(info, out)
    _print_signature(info, out)
    _print_layers(info, out)
    return out.export_text()


def both_ways(path, *, no_normalize: bool = False) -> bool:
    """Assert that the light reader, where it answers, gives what loading gives; whether it answered."""
    light = light_info(_args(path, no_normalize=no_normalize))
    options = {"normalize": False} if no_normalize else {}
    full = describe(modelpress.load(path, show_progress=False, **options))
    if light is None:
        return False
    assert json.dumps(light, indent=2, default=str) == json.dumps(full, indent=2, default=str)
    assert _tables(light) == _tables(full)
    return True


def _save(model, path, **kwargs):
    onnx.save(model.to_proto(), path, **kwargs)
    return path


def test_plain_float_models_are_read_light_and_shown_as_loaded(tmp_path, digits_mlp_path):
    from modelpress.testing import tiny_cnn, tiny_mlp

    files = [
        _save(tiny_mlp(in_features=8, hidden=8), tmp_path / "mlp.onnx"),
        _save(tiny_cnn(channels=8), tmp_path / "cnn.onnx"),
        digits_mlp_path,
    ]
    _lstm_file(tmp_path / "lstm.onnx")
    files.append(tmp_path / "lstm.onnx")
    for path in files:
        assert both_ways(path), path
        assert both_ways(path, no_normalize=True), path


def test_quantized_models_are_read_light_and_count_as_loaded(tmp_path):
    from modelpress.data.samples import sample_inputs
    from modelpress.testing import tiny_cnn, tiny_mlp

    cnn = tiny_cnn(channels=16)
    calibration = [sample_inputs(cnn.signature, batch=8, seed=i) for i in range(2)]
    quiet = {"allow_no_gain": True, "show_progress": False}
    static = modelpress.quantize(
        cnn, "int8-static", calibration=calibration, smoothquant=False, **quiet
    )
    mlp = tiny_mlp(in_features=64, hidden=64)
    dynamic = modelpress.quantize(mlp, "int8-dynamic", min_elements=1, **quiet)
    int4 = modelpress.quantize(mlp, "int4-weight-only", min_elements=1, block_size=32, **quiet)
    for name, model in (("static", static), ("dynamic", dynamic), ("int4", int4)):
        path = _save(model, tmp_path / f"{name}.onnx")
        assert both_ways(path), name
        assert json.loads(json.dumps(light_info(_args(path))))["passes"]  # its history, as stored


def test_quantizing_leaves_the_parameter_count_unchanged(tmp_path):
    """Users count weights, not scales (issue #25): int8-static's SmoothQuant scale stored quantized
    (scale_q -> DequantizeLinear -> Mul) and int8-dynamic's rescale Mul after MatMulInteger hold
    scales; loaded and read light, each quantized docs model counts as many parameters as its
    source (9,930)."""
    from tests.docs_files import make_docs_files

    make_docs_files(tmp_path)
    source = modelpress.load(tmp_path / "model.onnx", show_progress=False)
    x = np.load(tmp_path / "calib.npz")["x"]
    # NOTE: 768 rows, not fewer than fc's 512 inputs, so SmoothQuant smooths it (and keeps its Mul)
    noisy = np.random.default_rng(0).standard_normal((2, *x.shape)).astype(np.float32)
    calibration = {"x": np.concatenate([x, x + 0.05 * noisy[0], x + 0.05 * noisy[1]])}
    quiet = {"allow_no_gain": True, "show_progress": False}
    quantized = {
        "int8-static": modelpress.quantize(source, "int8-static", calibration=calibration, **quiet),
        "int8-dynamic": modelpress.quantize(source, "int8-dynamic", **quiet),
        "int4": modelpress.quantize(source, "int4-weight-only", block_size=32, **quiet),
    }
    assert quantized["int8-static"].op_histogram().get("Mul")  # the SmoothQuant scale is there
    assert quantized["int8-dynamic"].op_histogram().get("MatMulInteger")
    for name, model in quantized.items():
        assert model.parameter_count() == source.parameter_count() == 9930, name
        path = _save(model, tmp_path / f"{name}.onnx")
        assert light_info(_args(path))["parameters"] == 9930, name


def test_external_data_is_sized_not_read(tmp_path):
    from modelpress.testing import tiny_cnn

    path = _save(
        tiny_cnn(channels=8),
        tmp_path / "ext.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="ext.onnx.data",
        size_threshold=0,
    )
    assert both_ways(path)
    info = light_info(_args(path))
    assert info["size_on_disk"] == path.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    (tmp_path / "ext.onnx.data").write_bytes(
        b"short"
    )  # data that does not fit: the full load judges
    with pytest.raises(CannotAnswer, match="does not fit"):
        read_onnx(path)


def _constant_weight_file(path) -> None:
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=weight),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_what_the_reader_cannot_answer_goes_through_the_full_load(tmp_path):
    _constant_weight_file(tmp_path / "const.onnx")
    with pytest.raises(CannotAnswer, match="Constant"):  # normalisation lifts it
        read_onnx(tmp_path / "const.onnx")
    assert not both_ways(tmp_path / "const.onnx")
    # as stored (--no-normalize) the light reader answers: a Constant's tensor is a weight
    assert both_ways(tmp_path / "const.onnx", no_normalize=True)
    (tmp_path / "bad.onnx").write_bytes(b"\x0a\xff\xff\xff\xff not onnx")
    with pytest.raises(CannotAnswer):
        read_onnx(tmp_path / "bad.onnx")


def _zoo_files():
    from benchmarks.real_models import cache_dir

    found = sorted(cache_dir().glob("*.onnx")) if cache_dir().is_dir() else []
    return found or [pytest.param(None, marks=pytest.mark.skip(reason="no zoo model cached"))]


@pytest.mark.slow
@pytest.mark.parametrize("path", _zoo_files(), ids=lambda p: getattr(p, "name", "none"))
def test_zoo_models_show_the_same_figures_both_ways(path):
    both_ways(path)
    both_ways(path, no_normalize=True)


def _attribute_file(path) -> None:
    """Attributes of every kind the rules may read: negative ints, int lists, floats, text."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "conv.w"),
        numpy_helper.from_array(rng.standard_normal((5, 4)).astype(np.float32), "fc.w"),
        numpy_helper.from_array(np.zeros(5, np.float32), "fc.b"),
    ]
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv.w"], ["c"], pads=[1, 1, 1, 1], strides=[1, 1], name="conv"
        ),
        helper.make_node("ReduceMean", ["c"], ["m"], axes=[-1, -2], keepdims=0, name="pool"),
        helper.make_node("Gemm", ["m", "fc.w", "fc.b"], ["g"], transB=1, alpha=0.5, name="fc"),
        helper.make_node("LeakyRelu", ["g"], ["l"], alpha=0.1, name="act"),
        helper.make_node("Einsum", ["l"], ["y"], equation="bi->bi", name="same"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_attributes_read_as_onnx_ir_reads_them(tmp_path):
    path = tmp_path / "attrs.onnx"
    _attribute_file(path)
    loaded = modelpress.load(path, normalize=False, show_progress=False).ir.graph
    light = read_onnx(path).ir.graph

    def attributes(graph):
        return [
            (n.name, n.op_type, {k: (a.type, a.value) for k, a in n.attributes.items()})
            for n in graph
        ]

    expected = [
        (
            name,
            op,
            {
                k: (int(t), list(v) if isinstance(v, (tuple, list)) else v)
                for k, (t, v) in attrs.items()
            },
        )
        for name, op, attrs in attributes(loaded)
    ]
    got = [
        (
            name,
            op,
            {k: (t, list(v) if isinstance(v, (tuple, list)) else v) for k, (t, v) in attrs.items()},
        )
        for name, op, attrs in attributes(light)
    ]
    assert got == expected and got[1][2]["axes"] == (7, [-1, -2])
    assert both_ways(path) and both_ways(path, no_normalize=True)


def test_an_output_of_unknown_dims_is_left_to_shape_inference(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
    )
    path = tmp_path / "untyped.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(CannotAnswer, match="shape inference"):
        read_onnx(path)
    assert light_info(_args(path)) is None and describe(modelpress.load(path))["outputs"][0][
        "shape"
    ] == ["N", 4]


def test_initializers_listed_as_inputs_are_weights_not_inputs(tmp_path):
    """IR < 4 files list every initializer among the graph inputs."""
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [4, 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [weight],
    )
    path = tmp_path / "ir3.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    onnx.save(model, path)
    assert both_ways(path) and both_ways(path, no_normalize=True)
    info = light_info(_args(path))
    assert [s["name"] for s in info["inputs"]] == ["x"] and info["parameters"] == 12


def test_an_int8_embeddings_row_scales_are_not_parameters(tmp_path):
    """An int8 embedding lookup (``Gather(int8) -> Cast -> Mul(Gather(row scales))``) counts its
    table once, not its 300 row scales (the Hugging Face guide's count rose 93,006 -> 93,306)."""
    rng = np.random.default_rng(0)
    weights = [
        numpy_helper.from_array(rng.normal(size=(300, 64)).astype(np.float32), "emb"),
        numpy_helper.from_array(rng.normal(size=(64, 8)).astype(np.float32), "W"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["emb", "ids"], ["e"], name="embed"),
            helper.make_node("MatMul", ["e", "W"], ["y"], name="fc"),
        ],
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 8])],
        weights,
    )
    source = modelpress.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    quantized = modelpress.quantize(source, "int8-dynamic", show_progress=False)
    assert quantized.op_histogram()["Gather"] == 2  # the int8 rows and their scales
    assert quantized.parameter_count() == source.parameter_count() == 300 * 64 + 64 * 8
    path = _save(quantized, tmp_path / "lookup.onnx")
    assert light_info(_args(path))["parameters"] == 300 * 64 + 64 * 8


def test_rotary_tables_are_not_parameters():
    """GroupQueryAttention's cos/sin caches (a directly written Llama's) are computed from the
    config, not learned: transformers' num_parameters does not count them, nor do we."""
    import onnx_ir as ir

    from modelpress.ir.counting import parameter_count

    rng = np.random.default_rng(0)
    qkv = numpy_helper.from_array(rng.normal(size=(64, 128)).astype(np.float32), "qkv")
    caches = [
        numpy_helper.from_array(rng.normal(size=(2048, 8)).astype(np.float32), name)
        for name in ("cos_cache", "sin_cache")
    ]
    attention = helper.make_node(
        "GroupQueryAttention",
        ["q", "", "", "past_key", "past_value", "seqlens", "total", "cos_cache", "sin_cache"],
        ["attn", "present_key", "present_value"],
        domain="com.microsoft",
        num_heads=4,
        kv_num_heads=2,
        do_rotary=1,
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "qkv"], ["q"]), attention],
        "rotary",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", 64]),
            helper.make_tensor_value_info("past_key", TensorProto.FLOAT, [1, 2, "p", 16]),
            helper.make_tensor_value_info("past_value", TensorProto.FLOAT, [1, 2, "p", 16]),
            helper.make_tensor_value_info("seqlens", TensorProto.INT32, [1]),
            helper.make_tensor_value_info("total", TensorProto.INT32, []),
        ],
        [helper.make_tensor_value_info("attn", TensorProto.FLOAT, [1, "s", 64])],
        [qkv, *caches],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert parameter_count(ir.serde.deserialize_model(model)) == 64 * 128
