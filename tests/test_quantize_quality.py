"""SmoothQuant (int8-static), AWQ (int4 weight-only) and mixed precision under a size budget or an
accuracy drop, on a small MLP whose input has planted outlier channels (the situation they are for)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.base.errors import ModelpressError
from modelpress.runtime.session import make_session, run
from modelpress.testing import make_model

K, H, OUT = 64, 128, 32


def _mlp(tmp_path) -> tuple[modelpress.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.2, (K, H)).astype(np.float32),
        "b1": rng.normal(0, 0.1, H).astype(np.float32),
        "w2": rng.normal(0, 0.2, (H, OUT)).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="add1"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="fc2"),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", OUT])],
        weights,
        name="outliers",
    )
    x = rng.normal(0, 1, (256, K)).astype(np.float32)
    x[:, 3] *= 60  # NOTE: the planted outlier channels
    x[:, 10] *= 30
    return model, x, run(make_session(model), {"x": x})[0]


def _error(result: modelpress.Model, x: np.ndarray, expected: np.ndarray, path) -> float:
    exported = modelpress.export(result, path, verify=False)
    out = run(make_session(exported.path), {"x": x})[0]
    return float(np.linalg.norm(out - expected) / np.linalg.norm(expected))


def test_smoothquant_migrates_outlier_channels_into_the_weights(tmp_path):
    model, x, expected = _mlp(tmp_path)
    before = model.initializer("w1").const_value.numpy().copy()
    plain = modelpress.quantize(
        model,
        "int8-static",
        calibration={"x": x},
        sensitivity=False,
        smoothquant=False,
        show_progress=False,
    )
    smooth = modelpress.quantize(
        model,
        "int8-static",
        calibration={"x": x},
        sensitivity=False,
        smoothquant=True,
        show_progress=False,
    )
    figures = smooth.provenance.passes[-1].figures
    assert (
        0 < figures["smoothquant_alpha"]["fc1"] <= 0.8 and figures["smoothquant_error_ratio"] < 0.9
    )
    # a Mul by 1/s on the activation edge, the quantized fc1 reading it
    graph = smooth.to_proto().graph
    mul = next(n for n in graph.node if n.op_type == "Mul" and n.input[0] == "x")
    scale = onnx.numpy_helper.to_array(next(i for i in graph.initializer if i.name == mul.input[1]))
    assert scale[3] < np.median(scale) and scale[10] < np.median(
        scale
    )  # the outlier channels are divided down most
    assert _error(smooth, x, expected, tmp_path / "s.onnx") < 0.75 * _error(
        plain, x, expected, tmp_path / "p.onnx"
    )
    np.testing.assert_array_equal(
        model.initializer("w1").const_value.numpy(), before
    )  # the input model is untouched


def _textbook_gptq(w: np.ndarray, x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """GPTQ as its paper writes it: the upper Cholesky factor of the inverse of the dampened ``X^T X``."""
    h = x.astype(np.float64).T @ x.astype(np.float64)
    h[np.diag_indices(len(h))] += 0.01 * np.mean(np.diag(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    work, codes = w.astype(np.float64).copy(), np.zeros(w.shape)
    for i in range(len(w)):
        codes[i] = np.clip(np.round(work[i] / scale), -127, 127)
        error = (work[i] - codes[i] * scale) / u[i, i]
        work[i + 1 :] -= np.outer(u[i, i + 1 :], error)
    return codes


def test_gptq_rounding_is_the_paper_s_and_beats_rounding_to_nearest():
    """The factorisation-only form (one Cholesky of ``X^T X`` reversed, no inverse) rounds every weight as
    the paper's inverse-Hessian form does, and ``x @ W`` stays closer than rounding each weight alone."""
    from modelpress.plugins.quantize.affine import INT8_WEIGHTS
    from modelpress.plugins.quantize.gptq_int8 import feedback, gptq_codes

    rng = np.random.default_rng(0)
    k, n = 300, 48  # NOTE: past one block of 128 rows, and a partial last block
    x = rng.standard_normal((512, k)) @ rng.normal(0, 0.3, (k, k)) + rng.standard_normal((512, k))
    x = x.astype(np.float32)
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    scale = np.abs(w).max(axis=0) / 127
    codes = gptq_codes(w, feedback(x), scale, INT8_WEIGHTS)
    textbook = _textbook_gptq(w, x, scale)
    assert codes.dtype == np.int8 and np.mean(codes != textbook) < 1e-3  # float32 vs float64 ties
    nearest = np.clip(np.round(w / scale), -127, 127)

    def error(q: np.ndarray) -> float:
        return float(np.linalg.norm(x @ (q * scale) - x @ w) / np.linalg.norm(x @ w))

    assert error(codes) < 0.8 * error(nearest)


def _row_by_row_gptq(w: np.ndarray, fb: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """GPTQ's rows one at a time, as gptq_codes defines its arithmetic: the earlier blocks' errors through
    one product, the block's own rows' feedback summed in float32 one product at a time, in order."""
    k, n = w.shape
    diff, codes = np.zeros((k, n), np.float32), np.zeros((k, n), np.int8)
    for b0 in range(0, k, 128):
        b1 = min(k, b0 + 128)
        target = w[b0:b1] + fb[:b0, b0:b1].T @ diff[:b0] if b0 else w[b0:b1].copy()
        for i in range(b0, b1):
            row = target[i - b0]
            if i > b0:
                fed = np.zeros(n, np.float32)
                for j in range(b0, i):
                    fed = fed + np.float32(fb[j, i]) * diff[j]
                row = row + fed
            q = np.clip(np.round(row / scale), -127, 127)
            codes[i], diff[i] = q, w[i] - q * scale
    return codes


def test_gptq_codes_sum_each_row_s_feedback_in_order():
    """gptq_codes pushes each row's error onto the rows after it a block at a time, with the arithmetic
    of summing every row's feedback one product at a time: the same codes, bit for bit, as that loop
    (int8-static's files are those of the row-by-row products NumPy made before)."""
    from modelpress.plugins.quantize.affine import INT8_WEIGHTS
    from modelpress.plugins.quantize.gptq_int8 import feedback, gptq_codes, one_blas_thread

    rng = np.random.default_rng(1)
    for k, n in ((40, 7), (129, 16), (300, 33)):
        x = (rng.standard_normal((2 * k, k)) * rng.uniform(0.1, 5, k)).astype(np.float32)
        w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        with one_blas_thread():
            fb = feedback(x)
            assert fb is not None
            assert np.array_equal(
                gptq_codes(w, fb, scale, INT8_WEIGHTS), _row_by_row_gptq(w, fb, scale)
            )


def test_int8_static_rounds_smoothed_weights_by_gptq(tmp_path, monkeypatch):
    # NOTE: as on a CPU with VNNI: without it, a channel whose scale is widened so that its codes
    # cannot saturate is rounded to nearest on the wider scale (GPTQ rounded on the 8-bit one)
    monkeypatch.setenv("MODELPRESS_INT8_VNNI", "1")
    model, x, expected = _mlp(tmp_path)
    results = {
        rounding: modelpress.quantize(
            model,
            "int8-static",
            calibration={"x": x},
            sensitivity=False,
            weight_rounding=rounding,
            show_progress=False,
        )
        for rounding in ("gptq", "nearest")
    }
    errors = {k: _error(r, x, expected, tmp_path / f"{k}.onnx") for k, r in results.items()}
    assert errors["gptq"] < errors["nearest"]
    rounded = {
        k: r.provenance.passes[-1].figures["gptq_rounded_layers"] for k, r in results.items()
    }
    assert rounded == {"gptq": 2, "nearest": 0}


def test_auto_calibrator_picks_per_tensor_by_measured_error(tmp_path):
    model, x, expected = _mlp(tmp_path)
    errors, chosen = {}, {}
    for calibrator in ("percentile", "entropy", "auto"):
        result = modelpress.quantize(
            model,
            "int8-static",
            calibration={"x": x},
            sensitivity=False,
            smoothquant=False,
            calibrator=calibrator,
            show_progress=False,
        )
        errors[calibrator] = _error(result, x, expected, tmp_path / f"{calibrator}.onnx")
        chosen[calibrator] = result.provenance.passes[-1].figures.get("calibrators_chosen")
    assert (
        sum(chosen["auto"].values()) == 2 and chosen["percentile"] is None
    )  # fc1's and fc2's inputs
    assert (
        errors["entropy"] > 2 * errors["percentile"]
    )  # entropy clips the planted outliers: a bad choice here
    assert errors["auto"] <= errors["percentile"] * 1.001


def test_awq_beats_round_to_nearest_and_keeps_the_function(tmp_path):
    model, x, expected = _mlp(tmp_path)
    rtn = modelpress.quantize(model, "int4-weight-only", block_size=32, show_progress=False)
    awq = modelpress.quantize(
        model,
        "int4-weight-only",
        block_size=32,
        algorithm="awq",
        calibration={"x": x},
        show_progress=False,
    )
    figures = awq.provenance.passes[-1].figures
    assert figures["awq_alpha"] and figures["awq_error_ratio"] < 1
    assert _error(awq, x, expected, tmp_path / "a.onnx") < 0.85 * _error(
        rtn, x, expected, tmp_path / "r.onnx"
    )
    gptq = modelpress.quantize(
        model,
        "int4-weight-only",
        block_size=32,
        algorithm="gptq",
        calibration={"x": x},
        show_progress=False,
    )
    both = modelpress.quantize(
        model,
        "int4-weight-only",
        block_size=32,
        algorithm="awq-gptq",
        calibration={"x": x},
        show_progress=False,
    )
    assert _error(both, x, expected, tmp_path / "b.onnx") < 0.85 * _error(
        gptq, x, expected, tmp_path / "g.onnx"
    )
    with pytest.raises(ModelpressError, match="calibration"):
        modelpress.quantize(model, "int4-weight-only", algorithm="awq", show_progress=False)


def test_mixed_precision_meets_a_size_budget_and_a_drop(tmp_path):
    model, x, expected = _mlp(tmp_path)
    size = {}
    errors = {}
    for target in (0.2, 0.32, 0.6):
        result = modelpress.quantize(
            model, "mixed-precision", calibration={"x": x}, target_size=target, show_progress=False
        )
        figures = result.provenance.passes[-1].figures
        assert figures["size_ratio_estimate"] <= target
        exported = modelpress.export(result, tmp_path / f"m{target}.onnx", verify=False)
        size[target] = exported.path.stat().st_size
        errors[target] = _error(result, x, expected, tmp_path / f"e{target}.onnx")
    assert (
        figures["layers_by_bits"]["float"] >= 1
    )  # 0.6 affords float for the most sensitive layer per byte
    assert size[0.2] < size[0.32] < size[0.6] and errors[0.2] > errors[0.32] > errors[0.6]
    drop = modelpress.quantize(
        model, "mixed-precision", calibration={"x": x}, max_drop=0.0005, show_progress=False
    )
    figures = drop.provenance.passes[-1].figures
    assert figures["criteria_met"] is True and "cosine" in figures["criteria"]
    out = run(
        make_session(modelpress.export(drop, tmp_path / "d.onnx", verify=False).path), {"x": x}
    )[0]
    cosines = (
        np.sum(out * expected, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosines.mean() >= 1 - 0.0005
    with pytest.raises(ModelpressError, match="smallest"):
        modelpress.quantize(
            model, "mixed-precision", calibration={"x": x}, target_size=0.05, show_progress=False
        )
    with pytest.raises(ModelpressError, match="target_size"):
        modelpress.quantize(model, "mixed-precision", calibration={"x": x}, show_progress=False)


def test_report_lists_float_nodes_compactly_by_reason():
    from modelpress.app.compress import StageMetrics
    from modelpress.app.report import Report

    float_nodes = {f"/MatMul_{i}": f"sensitive: 1/SQNR 0.{i} alone" for i in range(9)} | {
        "fc_last": "excluded by option"
    }
    report = Report(title="t", metric="cosine")
    for name, figures in (
        ("source", {}),
        ("quantize", {"float_nodes": float_nodes, "criteria": "y cosine 0.99"}),
    ):
        report.add(
            StageMetrics(name, "cosine", 0.99, 1000, 500, 10, 0.0, {}, 0.1, f"{name}.onnx", figures)
        )
    markdown = report.markdown()
    line = next(row for row in markdown.splitlines() if row.startswith("- **float_nodes**"))
    assert line == (
        "- **float_nodes**: 10 — sensitive (9): /MatMul_0, /MatMul_1, /MatMul_2, /MatMul_3, /MatMul_4, /MatMul_5, ...; "
        "excluded by option (1): fc_last"
    )
    assert (
        '"/MatMul_0"' not in markdown and '"criteria": "y cosine 0.99"' in markdown
    )  # no raw dict; other figures stay


def test_mixed_precision_drop_search_computes_gptq_statistics_once(tmp_path, monkeypatch):
    """Every candidate of the max_drop bisection reuses the GPTQ statistics of the scoring pass."""
    import importlib

    mixed = importlib.import_module("modelpress.plugins.quantize.mixed")
    weight_only = importlib.import_module("modelpress.plugins.quantize.weight_only")
    model, x, expected = _mlp(tmp_path)
    calls = []
    real = weight_only._hessians

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(weight_only, "_hessians", counting)
    monkeypatch.setattr(mixed, "_hessians", counting)
    built = []
    real_build = mixed._build

    def recording(model, cands, bits, *args):  # type: ignore[no-untyped-def]
        built.append(list(bits))
        return real_build(model, cands, bits, *args)

    monkeypatch.setattr(mixed, "_build", recording)
    result = modelpress.quantize(
        model,
        "mixed-precision",
        calibration={"x": x},
        max_drop=0.05,
        algorithm="gptq",
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    assert figures["criteria_met"] is True
    assert len(built) >= 3 and any(
        4 in bits for bits in built
    )  # several candidates, GPTQ int4 among them, ...
    assert len(calls) == 1  # ... on one pass of statistics
    out = run(
        make_session(modelpress.export(result, tmp_path / "g.onnx", verify=False).path), {"x": x}
    )[0]
    cosines = (
        np.sum(out * expected, 1) / np.linalg.norm(out, axis=1) / np.linalg.norm(expected, axis=1)
    )
    assert cosines.mean() >= 1 - 0.05
