"""int4-weight-only at its defaults: data-aware when calibration data is given (held-out gain over
round to nearest), a per-weight format that ONNX Runtime runs without dequantizing on every run
(a shared weight gets MatMulNBits), and int8-static's low-bit share counting a shared weight once."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import make_model

D, OUT = 64, 32


def _graph_sha(model: modelpress.Model) -> str:
    """The graph's bytes (nodes and tensors; not the provenance, which holds wall times)."""
    return hashlib.sha256(model.to_proto().graph.SerializeToString()).hexdigest()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.ravel(), b.ravel()) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _shared_model() -> modelpress.Model:
    """``w`` feeds three MatMuls (a weight-tied stack, as ALBERT-style encoders share layers); ``u`` one."""
    rng = np.random.default_rng(0)
    weights = {
        "w": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32),
        "u": (rng.standard_normal((D, OUT)) / np.sqrt(D)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h1"], name="layer1"),
        helper.make_node("Tanh", ["h1"], ["a1"], name="act1"),
        helper.make_node("MatMul", ["a1", "w"], ["h2"], name="layer2"),
        helper.make_node("Tanh", ["h2"], ["a2"], name="act2"),
        helper.make_node("MatMul", ["a2", "w"], ["h3"], name="layer3"),
        helper.make_node("MatMul", ["h3", "u"], ["y"], name="head"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT])],
        weights,
        name="shared",
    )


def _after_ort_optimizes(path, tmp_path) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """The op histogram of the graph ONNX Runtime runs (its optimized model, written by the session)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


def test_a_shared_weight_gets_matmulnbits_the_rest_stays_qdq(tmp_path):
    model = _shared_model()
    auto = modelpress.quantize(model, "int4-weight-only", block_size=32, show_progress=False)
    figures = auto.provenance.passes[-1].figures
    assert figures["weight_formats"] == {"qdq": 1, "matmulnbits": 1}
    assert list(figures["matmulnbits_weights"]) == ["w"] and figures["matmulnbits_weights"][
        "w"
    ].startswith("shared by 3 MatMuls")
    assert auto.op_histogram() == {
        "com.microsoft::MatMulNBits": 3,
        "DequantizeLinear": 1,
        "MatMul": 1,
        "Tanh": 2,
    }
    assert (
        sum(1 for name in auto.graph.initializers if name.endswith("_nbits")) == 1
    )  # stored once, read three times
    qdq = modelpress.quantize(
        model, "int4-weight-only", block_size=32, format="qdq", show_progress=False
    )
    nbits = modelpress.quantize(
        model, "int4-weight-only", block_size=32, format="matmulnbits", show_progress=False
    )
    # the same bytes as each fixed format where that format is chosen
    for name, other in (("w_nbits", nbits), ("u_q4", qdq)):
        assert (
            auto.initializer(name).const_value.tobytes()
            == other.initializer(name).const_value.tobytes()
        )
    # ORT leaves the shared weight's DequantizeLinear unfused in the QDQ file (it runs on every call); in the
    # auto file every DequantizeLinear is fused into MatMulNBits
    qdq_path = modelpress.export(qdq, tmp_path / "qdq.onnx", verify=False).path
    auto_path = modelpress.export(auto, tmp_path / "auto.onnx", verify=False).path
    assert _after_ort_optimizes(qdq_path, tmp_path).get("DequantizeLinear", 0) >= 1
    optimized = _after_ort_optimizes(auto_path, tmp_path)
    assert "DequantizeLinear" not in optimized and optimized["MatMulNBits"] == 4


def test_the_per_weight_format_keeps_the_numerics(tmp_path):
    model = _shared_model()
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((256, D)) @ rng.standard_normal((D, D)) / 4).astype(
        np.float32
    )  # correlated features
    calibration, held_out = {"x": x[:192]}, {"x": x[192:]}
    expected = run(make_session(model), held_out)[0]
    cosines = {}
    for algorithm in ("rtn", "gptq"):
        for label, fmt, level in (
            ("auto", "auto", None),
            ("auto0", "auto", 0),
            ("qdq", "qdq", None),
        ):
            q = modelpress.quantize(
                model,
                "int4-weight-only",
                block_size=32,
                format=fmt,
                accuracy_level=level,
                algorithm=algorithm,
                calibration=calibration,
                show_progress=False,
            )
            path = modelpress.export(q, tmp_path / f"{algorithm}-{label}.onnx", verify=False).path
            cosines[algorithm, label] = _cosine(run(make_session(path), held_out)[0], expected)
        # MatMulNBits at accuracy_level 0 computes in float from the same codes the unfused DequantizeLinear reads;
        # at its default (4: int8 activations, as ORT runs the QDQ weights it fuses) within 1e-3 of it
        assert cosines[algorithm, "auto0"] >= cosines[algorithm, "qdq"] - 1e-6, cosines
        assert cosines[algorithm, "auto"] >= cosines[algorithm, "qdq"] - 1e-3, cosines
    # GPTQ quantizes the shared weight once against the statistics of all three inputs that read it
    assert cosines["gptq", "auto"] > cosines["rtn", "auto"] > 0.98, cosines


def test_int8_and_fixed_formats_are_untouched_by_the_choice():
    model = _shared_model()
    int8 = modelpress.quantize(model, "int8-weight-only", block_size=32, show_progress=False)
    assert int8.provenance.passes[-1].figures["weight_formats"] == {"qdq": 2, "matmulnbits": 0}
    assert "com.microsoft::MatMulNBits" not in int8.op_histogram()
    qdq = modelpress.quantize(
        model, "int4-weight-only", block_size=32, format="qdq", show_progress=False
    )
    assert qdq.provenance.passes[-1].figures["weight_formats"] == {"qdq": 2, "matmulnbits": 0}
    assert "matmulnbits_weights" not in qdq.provenance.passes[-1].figures


# -- the data-aware default ---------------------------------------------------------------------------


def _blocks(model: modelpress.Model) -> set[int]:
    return {
        n.attributes["block_size"].as_int()
        for n in model.graph
        if n.op_type in ("DequantizeLinear", "MatMulNBits") and "block_size" in n.attributes
    }


def test_the_block_size_follows_the_algorithm_unless_given():
    """Unset, ``block_size`` is 32 for an algorithm that reads calibration data and ONNX Runtime's 128 otherwise;
    the figure says which and why; a given block size always wins."""
    model = _shared_model()
    data = {"x": np.random.default_rng(5).standard_normal((64, D)).astype(np.float32)}
    cases = [
        ({}, "128: ONNX Runtime's MatMulNBitsQuantizer default"),
        ({"calibration": data}, "32: gptq reads calibration data"),
        ({"calibration": data, "algorithm": "awq"}, "32: awq reads calibration data"),
        ({"calibration": data, "algorithm": "rtn"}, "128: ONNX Runtime's"),
        ({"calibration": data, "block_size": 64}, "64: chosen by the user"),
    ]
    for options, why in cases:
        q = modelpress.quantize(model, "int4-weight-only", show_progress=False, **options)
        figure = q.provenance.passes[-1].figures["block_size"]
        assert figure.startswith(why), (options, figure)
        assert _blocks(q) == {int(why.split(":")[0])}, options


@pytest.fixture(scope="module")
def encoder(digits, tmp_path_factory):
    """The tests' small transformer (decomposed LayerNorm, GELU, attention), trained on digits rows."""
    pytest.importorskip("torch", reason="needs the torch extra")
    from tests import quant_models as qm

    rows = digits["x_train"].reshape(-1, 8, 8)
    module = qm.train(qm.Encoder(), rows, digits["y_train"], epochs=3)
    path = qm.export(
        module, rows, tmp_path_factory.mktemp("int4") / "encoder.onnx", "rows", "logits"
    )
    return modelpress.load(path), rows[:256], digits["x_test"].reshape(-1, 8, 8)


@pytest.mark.torch
@pytest.mark.slow
def test_calibration_data_makes_the_default_data_aware_and_better_held_out(encoder, tmp_path):
    model, calibration, held_out = encoder
    expected = run(make_session(model), {"rows": held_out})[0]
    plain = modelpress.quantize(model, "int4-weight-only", show_progress=False)
    aware = modelpress.quantize(
        model, "int4-weight-only", calibration={"rows": calibration}, show_progress=False
    )
    assert plain.provenance.passes[-1].figures["algorithm"] == "rtn: no calibration data"
    assert aware.provenance.passes[-1].figures["algorithm"] == "gptq: calibration data given"
    assert aware.provenance.passes[-1].figures["block_size"].startswith("32: ")
    # without data: the bytes round to nearest always wrote; with data: exactly what algorithm="gptq" writes
    assert _graph_sha(plain) == _graph_sha(
        modelpress.quantize(model, "int4-weight-only", algorithm="rtn", show_progress=False)
    )
    gptq = modelpress.quantize(
        model,
        "int4-weight-only",
        algorithm="gptq",
        calibration={"rows": calibration},
        show_progress=False,
    )
    assert _graph_sha(aware) == _graph_sha(gptq)
    errors = {}
    for name, q in (("rtn", plain), ("default", aware)):
        out = run(
            make_session(modelpress.export(q, tmp_path / f"{name}.onnx", verify=False).path),
            {"rows": held_out},
        )[0]
        errors[name] = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
    print(f"held-out logits relative error: {errors}")
    assert errors["default"] < 0.8 * errors["rtn"], errors  # on data it never saw
    picked = modelpress.quantize(
        model,
        "int4-weight-only",
        algorithm="rtn",
        calibration={"rows": calibration},
        show_progress=False,
    )
    assert picked.provenance.passes[-1].figures["algorithm"] == "rtn: chosen by the user"
    assert _graph_sha(picked) == _graph_sha(plain)


# -- int8-static's low-bit share ------------------------------------------------------------------------


def test_low_bit_weight_share_counts_a_shared_weight_once():
    model = _shared_model()
    data = {"x": np.random.default_rng(2).standard_normal((64, D)).astype(np.float32)}
    result = modelpress.quantize(
        model,
        "int8-static",
        calibration=data,
        sensitivity=False,
        min_agreement=None,
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    assert figures["quantized_nodes"] == 4
    total = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    assert figures["low_bit_weight_share"] == pytest.approx((D * D + D * OUT) * 4 / total, abs=1e-4)
    assert 0 <= figures["low_bit_weight_share"] <= 1


# -- a table read by Slice (a position table) -----------------------------------------------------------


def _sliced_table_model() -> modelpress.Model:
    """A 64 x 32 table cut by ``Slice(table, start, end, axes=[0])`` with the bounds as inputs, then a MatMul."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node(
            "Slice", ["table", "start", "end", "axes"], ["rows"], name="position_slice"
        ),
        helper.make_node("MatMul", ["rows", "w"], ["y"], name="proj"),
    ]
    return make_model(
        nodes,
        [
            helper.make_tensor_value_info("start", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("end", TensorProto.INT64, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 32])],
        {
            "table": (rng.standard_normal((64, 32)) * 0.1).astype(np.float32),
            "axes": np.array([0], np.int64),
            "w": (rng.standard_normal((32, 32)) / 6).astype(np.float32),
        },
        name="sliced",
    )


def test_a_sliced_table_is_read_by_gather_block_quantized_with_slices_bounds(tmp_path):
    """The int4 position table is not dequantized whole on every run: ``Slice`` of its rows becomes
    GatherBlockQuantized of ``Range(start, end)``, with Slice's bounds (negative from the end, clamped to the
    table) and the same values as ``DequantizeLinear -> Slice`` of the same codes (``format="qdq"``)."""
    model = _sliced_table_model()
    auto = modelpress.quantize(model, "int4-weight-only", min_elements=256, show_progress=False)
    figures = auto.provenance.passes[-1].figures
    assert figures["table_kernels"]["sliced_rows"] == 1 and figures["tables_quantized"] == 1
    histogram = auto.op_histogram()
    assert histogram["com.microsoft::GatherBlockQuantized"] == 1
    assert "Slice" not in histogram and "DequantizeLinear" in histogram  # the weight's DQ only
    qdq = modelpress.quantize(
        model, "int4-weight-only", min_elements=256, format="qdq", show_progress=False
    )
    assert qdq.op_histogram()["Slice"] == 1
    paths = [
        modelpress.export(q, tmp_path / f"{name}.onnx", verify=False).path
        for name, q in (("auto", auto), ("qdq", qdq))
    ]
    sessions = [make_session(p) for p in paths]
    assert "DequantizeLinear" not in _after_ort_optimizes(paths[0], tmp_path)
    for start, end in ((0, 7), (3, 64), (-5, 1 << 62), (2, -1), (-100, 3), (5, 2), (60, 100)):
        feeds = {"start": np.array([start], np.int64), "end": np.array([end], np.int64)}
        got, expected = (run(s, feeds)[0] for s in sessions)
        assert got.shape == expected.shape == (len(range(64)[start:end]), 32), (start, end)
        np.testing.assert_allclose(got, expected, atol=1e-6)
