"""Numbers in the report that a user can trust: flags on real changes only, parameters counted as
weights, `.mpk` files as readable as `.onnx` ones, and report.html carrying all of report.md."""

import html
import json
import os
import re
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.app.compress import StageMetrics, latency_runs, latency_side_by_side
from modelpress.app.report import Report, looks_slower
from modelpress.data.samples import sample_inputs
from modelpress.testing import tiny_cnn, tiny_mlp


def _stage(name, size, latency=None, iqr=None, figures=None):
    return StageMetrics(
        name,
        "accuracy",
        0.9,
        size,
        size // 2,
        100,
        0.0,
        latency or {},
        0.1,
        f"{name}.onnx",
        figures or {},
        latency_iqr_ms=iqr or {},
    )


def _flags(*stages):
    report = Report(title="t", metric="accuracy")
    for s in stages:
        report.add(s)
    return report.regressions()


def test_bigger_needs_both_a_relative_and_an_absolute_growth():
    assert _flags(_stage("a", 50_000), _stage("b", 51_000)) == {}  # 0.050 -> 0.051 MB: 2 %, 1 KB
    assert _flags(_stage("a", 1_000_000), _stage("b", 1_015_000)) == {}  # 15 KB but 1.5 %
    assert _flags(_stage("a", 100_000), _stage("b", 110_000)) == {
        "b": ["bigger than 'a' (0.110 vs 0.100 MB)"]
    }


def test_a_stage_slower_than_the_source_is_flagged_even_when_faster_than_the_one_before():
    source = _stage("source", 1000, {"b1": 0.011}, {"b1": 0.0})
    int4 = _stage("int4", 400, {"b1": 0.026}, {"b1": 0.0})
    fp16 = _stage("fp16", 300, {"b1": 0.017}, {"b1": 0.0})
    assert _flags(source, int4, fp16) == {
        "int4": ["slower than 'source' at b1 (0.026 vs 0.011 ms)"],
        "fp16": ["slower than 'source' at b1 (0.017 vs 0.011 ms)"],
    }
    faster = _stage("fp16", 300, {"b1": 0.0112}, {"b1": 0.0})  # within 5 % of the source
    assert _flags(source, int4, faster) == {
        "int4": ["slower than 'source' at b1 (0.026 vs 0.011 ms)"]
    }


def test_slower_needs_more_than_the_noise_band():
    # NOTE: 10 % slower by the medians, but the runs spread over 20 %: noise
    assert (
        _flags(
            _stage("a", 1000, {"b1": 1.0}, {"b1": 0.2}),
            _stage("b", 1000, {"b1": 1.1}, {"b1": 0.05}),
        )
        == {}
    )
    worse = _flags(
        _stage("a", 1000, {"b1": 1.0}, {"b1": 0.02}), _stage("b", 1000, {"b1": 1.1}, {"b1": 0.03})
    )
    assert worse == {"b": ["slower than 'a' at b1 (1.100 vs 1.000 ms; noise band 4.7%)"]}
    # slower by its own timing, but not when both files were timed again side by side
    recheck = _stage("b", 1000, {"b1": 1.1}, {"b1": 0.03})
    recheck.latency_recheck_ms = {"b1": [1.0, 1.01, 0.04]}
    assert _flags(_stage("a", 1000, {"b1": 1.0}, {"b1": 0.02}), recheck) == {}
    recheck.latency_recheck_ms = {"b1": [1.0, 1.2, 0.04]}
    assert _flags(_stage("a", 1000, {"b1": 1.0}, {"b1": 0.02}), recheck)["b"] == [
        "slower than 'a' at b1 (1.100 vs 1.000 ms; noise band 4.7%; side by side 1.200 vs 1.000 ms)"
    ]
    # inside 5 % even with no spread
    assert (
        _flags(
            _stage("a", 1000, {"b1": 1.0}, {"b1": 0.0}),
            _stage("b", 1000, {"b1": 1.04}, {"b1": 0.0}),
        )
        == {}
    )


def _measured(name, runs, path):
    stage = _stage(
        name,
        1000,
        {"b1": float(np.median(runs))},
        {"b1": float(np.subtract(*np.percentile(runs, [75, 25])))},
    )
    stage.path = str(path)
    return stage


def _compared(before, stage, feeds):
    """What compress does after measuring a stage: where its own timing looks slower than the stage
    before, both files are timed again side by side and the report trusts that."""
    if looks_slower(before, stage, "b1"):
        stage.latency_recheck_ms["b1"] = latency_side_by_side(
            before.path, stage.path, feeds, threads=1, repeats=7
        )
    return _flags(before, stage)


def test_the_same_model_measured_twice_is_not_flagged_and_a_heavier_one_is(tmp_path):
    light, heavy = tmp_path / "light.onnx", tmp_path / "heavy.onnx"
    modelpress.export(tiny_cnn(channels=8, size=16), light, verify=False)
    modelpress.export(tiny_cnn(channels=64, size=48), heavy, verify=False)
    feeds = {"x": sample_inputs(modelpress.load(light).signature, batch=1)["x"]}
    # NOTE: one after the other, as compress measures its stages; a busy moment of the machine can
    # make the second look slower by its own timing (CI once saw 0.017 -> 0.027 ms), so the report
    # trusts only what timing both files in turns confirms
    first, again = (latency_runs(light, feeds, threads=1, repeats=20) for _ in range(2))
    a = _measured("a", first, light)
    assert _compared(a, _measured("b", again, light), feeds) == {}
    # NOTE: a 48x48, 64-channel model against a 16x16, 8-channel one: no busy moment hides that
    heavy_feeds = {"x": np.resize(feeds["x"], (1, 1, 48, 48))}
    slower = _measured("b", latency_runs(heavy, heavy_feeds, threads=1, repeats=10), heavy)
    worse = _flags(a, slower)
    assert list(worse) == ["b"] and worse["b"][0].startswith("slower than 'a' at b1")


@pytest.mark.parametrize(
    "make, options",
    [
        (lambda: tiny_cnn(channels=16), {}),
        # NOTE: no sensitivity search: with 7-bit weights (x86 without VNNI) it sends both of this
        # random MLP's layers to float or weight-only (one of 32 rows' top-1 changes), and this test
        # is about the integer graph's parameter count
        (lambda: tiny_mlp(in_features=64, hidden=64), {"smoothquant": False, "sensitivity": False}),
    ],
)
def test_quantizing_keeps_the_parameter_count(make, options):
    model = make()
    calibration = [sample_inputs(model.signature, batch=8, seed=i) for i in range(4)]
    expected = sum(
        int(np.prod(w.shape)) for w in (v.const_value for v in model.ir.graph.initializers.values())
    )
    assert model.parameter_count() == expected
    static = modelpress.quantize(
        model,
        method="int8-static",
        calibration=calibration,
        allow_no_gain=True,
        show_progress=False,
        **options,
    )
    assert "QuantizeLinear" in static.op_histogram() and static.parameter_count() == expected
    for method in ("int4-weight-only", "int8-weight-only"):
        weight_only = modelpress.quantize(
            model, method=method, allow_no_gain=True, show_progress=False, min_elements=1
        )
        assert (
            "DequantizeLinear" in weight_only.op_histogram()
            and weight_only.parameter_count() == expected
        )


def test_shape_constants_and_scales_are_not_parameters():
    w = numpy_helper.from_array(np.ones((6, 4), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 2, 2], np.int64), "shape")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Reshape", ["y", "shape"], ["z"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 2, 2])],
        [w, shape],
    )
    model = modelpress.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert model.parameter_count() == 24


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_packed_files_get_the_same_mode_as_exported_ones(tmp_path):
    old = os.umask(0o022)
    try:
        onnx_path = tmp_path / "m.onnx"
        modelpress.export(tiny_mlp(), onnx_path, verify=False)
        packed = modelpress.pack(onnx_path, tmp_path / "m.mpk").path
        assert (
            oct(os.stat(packed).st_mode & 0o777)
            == oct(os.stat(onnx_path).st_mode & 0o777)
            == oct(0o644)
        )
    finally:
        os.umask(old)


def _text(markup: str) -> str:
    return html.unescape(re.sub(r"<[^>]+>", "", markup)).replace("`", "")


def _md_facts(markdown: str) -> list[str]:
    facts, in_code = [], False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
            continue
        if not line.strip() or line.startswith("|---"):
            continue
        if line.startswith("|") and not in_code:
            facts += [cell.strip() for cell in line.strip("|").split(" | ")]
            continue
        facts.append(
            line if in_code else re.sub(r"^#+ |^- ", "", line).replace("**", "").replace("`", "")
        )
    return facts


def test_report_html_has_everything_report_md_has(tmp_path):
    model = tiny_cnn(channels=8, classes=4)
    x = np.random.default_rng(0).standard_normal((96, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:64])
    np.savez(tmp_path / "eval.npz", x=x[64:])
    recipe = {
        "passes": [
            {"kind": "prune", "method": "channel", "options": {"ratio": 0.5}},
            {
                "kind": "quantize",
                "method": "int8-static",
                "options": {"min_agreement": None, "min_cosine": None},
            },
        ],
        "data": {"calibration": "calib.npz", "eval": "eval.npz"},
        "evaluate": {"metric": "agreement", "repeats": 3, "batch_size": 16},
    }
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    modelpress.export(model, tmp_path / "tiny.onnx")
    result = modelpress.compress(
        tmp_path / "tiny.onnx",
        tmp_path / "recipe.json",
        output=tmp_path / "small.onnx",
        show_progress=False,
        allow_no_gain=True,
    )
    markdown, page = (tmp_path / "report.md").read_text(), (tmp_path / "report.html").read_text()
    assert (
        any(s.figures.get("no_gain") for s in result.stages)
        and "## quantize/int8-static" in markdown
    )
    text = _text(page)
    missing = [fact for fact in _md_facts(markdown) if fact not in text]
    assert not missing
    assert "class='flag flag-no-gain'" in page and ".flag-no-gain{" in page
    # a bigger and slower stage: each flag coloured, and its reason written out
    report = Report(title="t", metric="accuracy")
    for s in (_stage("a", 100_000, {"b1": 1.0}), _stage("b", 200_000, {"b1": 2.0})):
        report.add(s)
    page = report.html()
    assert (
        "<span class='flag flag-bigger'>bigger</span>, <span class='flag flag-slower'>slower</span>"
        in page
    )
    assert (
        "is bigger than 'a' (0.200 vs 0.100 MB); slower than 'a' at b1 (2.000 vs 1.000 ms)."
        in _text(page)
    )


def test_smoothquant_scales_are_not_parameters(tmp_path):
    model = tiny_mlp(in_features=256, hidden=256)
    calibration = [
        sample_inputs(model.signature, batch=16, seed=i) for i in range(20)
    ]  # 320 rows: not fewer than its 256 inputs
    expected = model.parameter_count()
    static = modelpress.quantize(
        model,
        method="int8-static",
        calibration=calibration,
        smoothquant=True,
        allow_no_gain=True,
        show_progress=False,
    )
    scales = [
        n
        for n in static.nodes()
        if n.op_type == "Mul" and n.metadata_props.get("modelpress.role") == "activation_scale"
    ]
    assert scales, static.op_histogram()  # SmoothQuant put its Mul on the activation
    assert static.parameter_count() == expected
    modelpress.export(static, tmp_path / "q.onnx", verify=False)
    assert modelpress.load(tmp_path / "q.onnx", show_progress=False).parameter_count() == expected


def _rounds(medians, jitter=0.01, runs=9, seed=0):
    """Synthetic timed runs (ms): one list of ``runs`` per round, around each round's median."""
    rng = np.random.default_rng(seed)
    return [list(m * (1 + rng.uniform(-jitter, jitter, runs))) for m in medians]


def _rechecked(before_rounds, stage_rounds):
    from modelpress.app.report import side_by_side

    stage = _stage("b", 1000, {"b1": 1.3}, {"b1": 0.01})  # NOTE: its own timing looks slower
    stage.latency_recheck_ms = {"b1": side_by_side(before_rounds, stage_rounds)}
    return _flags(_stage("a", 1000, {"b1": 1.0}, {"b1": 0.01}), stage)


def test_side_by_side_flags_only_a_slowdown_beyond_the_spread_of_the_rounds():
    from modelpress.app.report import side_by_side

    steady = _rounds([1.0, 1.0, 1.0])
    # a real 25 % slowdown in every round: flagged, with the side-by-side medians
    worse = _rechecked(steady, _rounds([1.25, 1.26, 1.24], seed=1))
    assert list(worse) == ["b"] and "side by side 1.2" in worse["b"][0]
    # the same model timed twice: no flag
    assert _rechecked(steady, _rounds([1.0, 1.0, 1.0], seed=2)) == {}
    # slower in two rounds, not at all in the third: the pooled runs' quartiles (the band before
    # the rounds were kept apart) said 23 % and flagged 30 %; the rounds' ratios spread 30 %
    two_of_three = _rounds([1.3, 1.3, 1.0], jitter=0.0)
    before, stage, band = side_by_side(_rounds([1.0] * 3, jitter=0.0), two_of_three)
    assert (before, stage) == (1.0, 1.3) and band == pytest.approx(0.3)
    assert _rechecked(_rounds([1.0] * 3, jitter=0.0), two_of_three) == {}
    # a busy moment on the source's rounds that makes the stage look faster or slower by turns
    assert _rechecked(_rounds([1.0, 1.4, 1.0]), _rounds([1.3, 1.3, 1.3], seed=3)) == {}
    # noise alone, many times over (the same distribution for both files): never flagged
    rng = np.random.default_rng(4)
    for seed in range(50):
        noisy = [list(rng.lognormal(0.0, 0.15, 9)) for _ in range(3)]
        again = [list(rng.lognormal(0.0, 0.15, 9)) for _ in range(3)]
        assert _rechecked(noisy, again) == {}, seed
