"""int8-static on models as converters emit them: patterns kept float, output-aware criteria,
size, the O(1)-session sensitivity search, and the CLI refusing a result that misses its criteria."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelpress
import modelpress.runtime.session
from modelpress.app.report import figure_text
from modelpress.plugins.quantize.patterns import find_patterns, mask_adds
from modelpress.testing import make_model
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def encoders(digits, tmp_path_factory):
    """A trained encoder with decomposed LayerNorm, erf- and tanh-GELU, Softmax and an attention-mask
    Add, exported twice: with classifier logits and with a pooled, L2-normalised embedding."""
    pytest.importorskip("torch", reason="needs the torch extra")
    from tests import quant_models as qm

    rows = digits["x_train"].reshape(-1, 8, 8)
    module = qm.train(qm.Encoder(), rows, digits["y_train"], epochs=8)
    folder = tmp_path_factory.mktemp("encoders")
    logits = qm.export(module, rows, folder / "logits.onnx", "rows", "logits")
    module.head = "embedding"
    embedding = qm.export(module, rows, folder / "embedding.onnx", "rows", "sentence_embedding")
    return logits, embedding, rows[:256], digits["x_test"].reshape(-1, 8, 8)


def _consumers(graph: onnx.GraphProto, tensor: str) -> list[str]:
    return [n.op_type for n in graph.node if tensor in n.input]


@pytest.mark.slow
@pytest.mark.torch
def test_decomposed_norms_and_activations_stay_float_without_sensitivity(
    encoders, digits, tmp_path
):
    logits, _, calibration, x_test = encoders
    model = modelpress.load(logits)
    patterns, masks = find_patterns(model.graph), mask_adds(model.graph)
    assert (
        sorted(p.kind for p in patterns).count("LayerNorm") == 4
        and sum(p.kind == "GELU" for p in patterns) == 2
    )
    assert len(masks) == 2
    inner = {n.name for p in patterns for n in p.nodes[:-1]} | {n.name for n in masks}
    quantized = modelpress.quantize(
        model, calibration=calibration, sensitivity=False, show_progress=False
    )
    figures = quantized.provenance.passes[-1].figures
    assert figures["patterns_kept_float"] == {
        "LayerNorm": 4,
        "GELU": 2,
        "Softmax": 2,
        "attention mask": 2,
    }
    graph = quantized.to_proto().graph
    produced = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if (
            node.name in inner
        ):  # nothing inside a pattern is quantized: no Q after it, no DQ before it
            assert all(
                op != "QuantizeLinear" for o in node.output for op in _consumers(graph, o)
            ), node.name
            if node.op_type != "ReduceMean" and node.op_type != "Sub":
                assert all(
                    produced[i].op_type != "DequantizeLinear" for i in node.input if i in produced
                ), node.name
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= 8  # the MatMuls still are
    assert figures["low_bit_weight_share"] >= 0.75
    exported = modelpress.export(quantized, tmp_path / "q.onnx", sample={"rows": x_test})
    assert exported.verification.top1_agreement >= 0.97
    q_acc = float(
        np.mean(
            modelpress.runtime.session.run(
                modelpress.runtime.session.make_session(exported.path), {"rows": x_test}
            )[0].argmax(1)
            == digits["y_test"]
        )
    )
    f_acc = float(
        np.mean(
            modelpress.runtime.session.run(
                modelpress.runtime.session.make_session(model), {"rows": x_test}
            )[0].argmax(1)
            == digits["y_test"]
        )
    )
    assert f_acc - q_acc <= 0.01


@pytest.mark.torch
def test_an_embedding_output_is_judged_by_cosine(encoders, tmp_path):
    _, embedding, calibration, x_test = encoders
    model = modelpress.load(embedding)
    quantized = modelpress.quantize(
        model, calibration=calibration, min_cosine=0.995, show_progress=False
    )
    figures = quantized.provenance.passes[-1].figures
    assert (
        figures["criteria_met"]
        and "sentence_embedding cosine" in figures["criteria"]
        and "agreement" not in figures["criteria"]
    )
    assert figures["calibration_cosine"] >= 0.995 and "calibration_agreement" not in figures
    verification = modelpress.export(
        quantized, tmp_path / "e.onnx", sample={"rows": x_test}
    ).verification
    assert (
        verification.outputs[0].criterion == "embedding: cosine"
        and verification.top1_agreement is None
    )
    assert verification.outputs[0].value >= 0.99
    # overridable: judged by agreement on request
    forced = modelpress.quantize(
        model,
        calibration=calibration,
        criteria={"sentence_embedding": "agreement>=0.5"},
        show_progress=False,
    )
    assert "top-1 agreement" in forced.provenance.passes[-1].figures["criteria"]


@pytest.mark.slow
@pytest.mark.torch
def test_a_conv_heavy_model_is_at_least_3_5x_smaller(digits, tmp_path):
    pytest.importorskip("torch", reason="needs the torch extra")
    from tests import quant_models as qm
    from tests.models import images

    x = images(digits["x_train"], "nchw")
    module = qm.train(qm.ConvNet(), x, digits["y_train"], epochs=3)
    source = qm.export(module, x, tmp_path / "conv.onnx", "x", "logits")
    quantized = modelpress.quantize(
        modelpress.load(source), calibration={"x": x[:256]}, show_progress=False
    )
    exported = modelpress.export(
        quantized, tmp_path / "q.onnx", sample={"x": images(digits["x_test"], "nchw")}
    )
    assert source.stat().st_size / exported.path.stat().st_size >= 3.5
    assert exported.verification.top1_agreement >= 0.97


def _deep_mlp(layers: int = 40, sensitive: int = 20):
    """``layers`` residual-free Gemm+Relu layers; layer ``sensitive`` sees one huge feature that it ignores."""
    rng = np.random.default_rng(0)
    width = 16
    nodes, weights, x = [], {}, "x"
    for i in range(layers):
        w = (np.eye(width) + 0.05 * rng.standard_normal((width, width))).astype(np.float32)
        if i == sensitive - 1:
            w[0] *= 1000.0
        if i == sensitive:
            w[:, 0] = 1e-5
        weights[f"w{i}"] = w
        nodes += [
            helper.make_node("Gemm", [x, f"w{i}"], [f"h{i}"], name=f"fc{i}", transB=1),
            helper.make_node("Relu", [f"h{i}"], [f"r{i}"], name=f"relu{i}"),
        ]
        x = f"r{i}"
    # NOTE: named as scores: a random head shows no class structure, so an unnamed one is judged as a regression
    nodes.append(helper.make_node("Gemm", [x, "head"], ["logits"], name="head", transB=1))
    weights["head"] = rng.standard_normal((6, width)).astype(np.float32)
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 6])],
        weights,
    )
    return model, {"x": np.abs(rng.standard_normal((256, width))).astype(np.float32)}


def test_sensitivity_builds_a_constant_number_of_sessions(monkeypatch):
    model, calibration = _deep_mlp()
    created = []
    real = modelpress.runtime.session.ort.InferenceSession

    class Counting(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            created.append(1)
            super().__init__(*args, **kwargs)

    # judged by the classifier scores' cosine (0.99): 40 int8 layers in a row leave too little margin for agreement
    naive = modelpress.quantize(
        model,
        calibration=calibration,
        calibrator="minmax",
        min_agreement=None,
        sensitivity=False,
        show_progress=False,
    )
    assert not naive.provenance.passes[-1].figures["criteria_met"]
    monkeypatch.setattr(modelpress.runtime.session.ort, "InferenceSession", Counting)
    guarded = modelpress.quantize(
        model, calibration=calibration, calibrator="minmax", min_agreement=None, show_progress=False
    )
    figures = guarded.provenance.passes[-1].figures
    assert figures["criteria_met"]
    # calibration, float reference, full int8, the one shadow pass, and at most max_evaluations=12 confirmations
    assert len(created) <= 16 < 41
    assert "fc20" in figures["weight_only_nodes"] or "fc20" in figures["float_nodes"]
    assert figures["quantized_nodes"] >= 30  # the rest stays int8


@pytest.mark.parametrize(
    "layers, form", [(40, "float"), (6, "weight-only")], ids=["small-node", "large-node"]
)
def test_auto_fallback_sends_a_small_node_to_float_and_a_large_one_to_weight_only(layers, form):
    """fallback="auto" (the default): a sensitive node holding under a tenth of the quantized layers'
    weight bytes (1 of 41 Gemms) leaves int8 as float with fp16 weights, which ORT runs at fp32's speed;
    one holding more (1 of 7) goes int8 weight-only first, where float would cost the file most.
    ``fallback="weight-only"`` sends the small one to weight-only as before."""
    model, calibration = _deep_mlp(layers=layers, sensitive=layers // 2)
    name = f"fc{layers // 2}"
    options = dict(calibrator="minmax", min_agreement=None, show_progress=False)
    figures = (
        modelpress.quantize(model, calibration=calibration, **options).provenance.passes[-1].figures
    )
    assert figures["criteria_met"]
    forms = {"float": figures["float_nodes"], "weight-only": figures["weight_only_nodes"]}
    assert name in forms[form] and all(name not in v for k, v in forms.items() if k != form)
    if form == "float":
        assert "fp16 weights" in figures["float_nodes"][name] and not figures["weight_only_nodes"]
        old = (
            modelpress.quantize(model, calibration=calibration, fallback="weight-only", **options)
            .provenance.passes[-1]
            .figures
        )
        assert name in old["weight_only_nodes"] and name not in old["float_nodes"]


@pytest.mark.slow
def test_cli_refuses_a_result_that_misses_its_criteria(tmp_path):
    model, calibration = _deep_mlp(layers=6, sensitive=3)
    source, calib = tmp_path / "m.onnx", tmp_path / "c.npz"
    onnx.save(model.to_proto(), source)
    np.savez(calib, **calibration)
    out = tmp_path / "q.onnx"
    args = (
        "quantize",
        str(source),
        "-o",
        str(out),
        "--calib",
        str(calib),
        "--calibrator",
        "minmax",
        "-O",
        "sensitivity=false",
        "-q",
    )
    refused = run_cli(*args)
    assert (
        refused.returncode == 4
        and "missed its accuracy criteria" in refused.stderr
        and "cosine" in refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1
    assert not out.exists()
    accepted = run_cli(*args, "--accept-loss")
    assert accepted.returncode == 0, accepted.stderr
    assert out.exists()


def test_float_fallback_keeps_fp16_weights_and_loads_in_ort(tmp_path):
    """A node the sensitivity search moves to float stores its weight as fp16 behind a Cast (float
    compute): the file is smaller than with fp32 fallback weights, loads in ORT and stays accurate."""
    model, calibration = _deep_mlp(layers=6, sensitive=3)
    files = {}
    for fp16 in (True, False):
        result = modelpress.quantize(
            model,
            calibration=calibration,
            calibrator="minmax",
            min_agreement=None,
            fallback="float",
            fallback_fp16=fp16,
            show_progress=False,
        )
        figures = result.provenance.passes[-1].figures
        assert figures["criteria_met"] and "fc3" in figures["float_nodes"]
        assert ("fp16 weights" in figures["float_nodes"]["fc3"]) == fp16 and figures[
            "fp16_weight_nodes"
        ] == int(fp16)
        assert (
            "sensitive, fp16 weights (1): fc3" in figure_text(figures["float_nodes"])
        ) == fp16  # the report shows the form
        files[fp16] = modelpress.export(result, tmp_path / f"fp16-{fp16}.onnx").path
    saved = onnx.load(files[True])
    fc3 = next(n for n in saved.graph.node if n.name == "fc3")
    cast = next(n for n in saved.graph.node if n.output[0] == fc3.input[1])
    assert cast.op_type == "Cast"
    weight = next(t for t in saved.graph.initializer if t.name == cast.input[0])
    assert (
        weight.data_type == TensorProto.FLOAT16
    )  # ORT may fold the Cast in memory; the file keeps fp16
    assert files[True].stat().st_size < files[False].stat().st_size - 0.75 * 16 * 16 * 2
    x = calibration["x"][:64]
    expected, actual = (
        modelpress.runtime.session.run(modelpress.runtime.session.make_session(m), {"x": x})[0]
        for m in (model, files[True])
    )
    cosines = np.sum(expected * actual, axis=1) / (
        np.linalg.norm(expected, axis=1) * np.linalg.norm(actual, axis=1)
    )
    assert cosines.mean() > 0.99


def _embedding_model():
    """Token ids -> Gather on a [2000, 64] table -> MatMul -> mean over tokens: an encoder's first steps."""
    rng = np.random.default_rng(0)
    table = (rng.standard_normal((2000, 64)) * 0.1).astype(np.float32)
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("MatMul", ["e", "w"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["emb"], name="pool", axes=[1], keepdims=0),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 12])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 64])],
        {"table": table, "w": w},
        opset=17,
    )
    return model, {"ids": rng.integers(0, 2000, (64, 12)).astype(np.int64)}


@pytest.mark.parametrize(
    ("method", "bits", "max_ratio"),
    [("int4-weight-only", 4, 0.2), ("int8-weight-only", 8, 0.3), ("int8-dynamic", 8, 0.3)],
)
def test_embedding_tables_are_quantized(tmp_path, method, bits, max_ratio):
    model, sample = _embedding_model()
    source = tmp_path / "f.onnx"
    onnx.save(model.to_proto(), source)
    options = {"block_size": 32} if method == "int4-weight-only" else {}
    quantized = modelpress.quantize(model, method, show_progress=False, **options)
    assert quantized.provenance.passes[-1].figures["tables_quantized"] == 1
    if (
        bits == 4
    ):  # NOTE: int4: ORT's GatherBlockQuantized reads the int4 table, no DQ of the whole table per run
        gather = next(n for n in quantized.graph if n.op_type == "GatherBlockQuantized")
        assert gather.inputs[0].dtype == onnx_ir_type(bits)
    else:  # NOTE: int8 rows: the Gather reads the int8 table and only the rows read are dequantized
        gather = next(n for n in quantized.graph if n.op_type == "Gather")
        assert gather.inputs[0].producer() is None
        assert gather.inputs[0].dtype == onnx_ir_type(bits)
    exported = modelpress.export(quantized, tmp_path / "q.onnx", sample=sample)
    assert exported.path.stat().st_size <= max_ratio * source.stat().st_size
    assert exported.verification.outputs[0].criterion == "embedding: cosine"
    assert exported.verification.outputs[0].value >= (0.98 if bits == 4 else 0.999)


def onnx_ir_type(bits: int):  # type: ignore[no-untyped-def]
    import onnx_ir as ir

    return ir.DataType.UINT4 if bits == 4 else ir.DataType.INT8


@pytest.mark.torch
def test_conv_weights_are_covered_by_weight_only_and_dynamic(digits, tmp_path):
    pytest.importorskip("torch", reason="needs the torch extra")
    from tests import quant_models as qm
    from tests.models import images

    x = images(digits["x_train"][:64], "nchw")
    source = qm.export(qm.ConvNet().eval(), x, tmp_path / "conv.onnx", "x", "logits")
    for method, bound in (
        ("int8-weight-only", 0.3),
        ("int8-dynamic", 0.3),
        ("int4-weight-only", 0.2),
    ):
        quantized = modelpress.quantize(modelpress.load(source), method, show_progress=False)
        convs = [n for n in quantized.graph if n.op_type == "Conv"]
        assert all(
            n.inputs[1].producer() is not None
            and n.inputs[1].producer().op_type == "DequantizeLinear"
            for n in convs
            if n.inputs[1].shape[0] > 32
        ), method
        exported = modelpress.export(quantized, tmp_path / f"{method}.onnx", sample={"x": x})
        assert exported.path.stat().st_size <= bound * source.stat().st_size, method
        assert exported.verification.cosine >= 0.99, method


def test_int8_static_stores_embedding_tables_in_int8():
    model, sample = _embedding_model()
    quantized = modelpress.quantize(model, calibration=sample, show_progress=False)
    figures = quantized.provenance.passes[-1].figures
    assert (
        figures["tables_quantized"] == 1
        and figures["low_bit_weight_share"] == 1.0
        and figures["criteria_met"]
    )
    assert modelpress.verify(quantized, sample=sample).outputs[0].value >= 0.999


def test_a_position_table_read_by_slice_is_an_embedding_table(tmp_path):
    """A transformer's position table is sliced to the sequence length (Slice -> Add), not gathered:
    it is stored as int8 rows too (MiniLM: its 512 x 384 position table was the int8 file's one fp32 table),
    and the same Slice cuts the int8 rows and their scales (a DQ of the whole table ran on every run)."""
    rng = np.random.default_rng(1)
    table = (rng.standard_normal((2000, 64)) * 0.1).astype(np.float32)
    positions = (rng.standard_normal((512, 64)) * 0.05).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embed"),
        helper.make_node("Shape", ["ids"], ["shape"], start=1, end=2),
        helper.make_node(
            "Slice", ["positions", "zero", "shape", "zero"], ["p"], name="position_slice"
        ),
        helper.make_node("Add", ["e", "p"], ["x"], name="add_positions"),
        helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
        helper.make_node("ReduceMean", ["h"], ["emb"], name="pool", axes=[1], keepdims=0),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 64])],
        {
            "table": table,
            "positions": positions,
            "zero": np.array([0], np.int64),
            "w": (rng.standard_normal((64, 64)) / 8).astype(np.float32),
        },
        opset=17,
    )
    sample = {"ids": rng.integers(0, 2000, (64, 12)).astype(np.int64)}
    for method, options in (("int8-static", {"calibration": sample}), ("int8-dynamic", {})):
        quantized = modelpress.quantize(model, method, show_progress=False, **options)
        assert quantized.provenance.passes[-1].figures["tables_quantized"] == 2, method
        # the int8 rows and their row scales are sliced, then only those rows dequantized
        sliced = [n for n in quantized.graph if n.op_type == "Slice"]
        assert {n.inputs[0].dtype for n in sliced} == {onnx_ir_type(8), ir.DataType.FLOAT}, method
        assert all(n.inputs[0].producer() is None for n in sliced), method  # no DQ of the table
        assert quantized.parameter_count() == model.parameter_count(), method
        exported = modelpress.export(quantized, tmp_path / f"{method}.onnx", sample=sample)
        assert exported.verification.outputs[0].value >= 0.999, method
