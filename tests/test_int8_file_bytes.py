"""What an int8-static file spends its bytes on beyond the weights (issue 24: MTCNN ONet's file was
larger than ORT's): a bias's int32 scale is written as the Mul of the input's and the weight's
scales, not stored, and the provenance entry is compact JSON without the options left at their
defaults. The file must still fuse into ORT's integer kernels, load back unchanged and count as before."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import modelpress
from modelpress.ir.provenance import PROVENANCE_KEY
from tests.models import tiny_cnn_int8


def _quantized(tmp_path, **options):
    cnn, calibration, result = tiny_cnn_int8(**options)
    path = tmp_path / "int8.onnx"
    modelpress.export(result, path, sample=calibration[0], show_progress=False)
    return cnn, result, path, calibration[0]


def test_bias_scales_are_a_product_of_scales_and_still_fuse(tmp_path):
    cnn, result, path, sample = _quantized(tmp_path)
    proto = onnx.load(path)
    stored = {t.name for t in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    biases = [
        n
        for n in proto.graph.node
        if n.op_type == "DequantizeLinear" and n.input[0].endswith("_q") and "bias" in n.input[0]
    ]
    assert biases  # tiny_cnn's convs have biases
    for dq in biases:
        assert dq.input[1] not in stored and producers[dq.input[1]].op_type == "Mul"
        # NOTE: the product of the DQ scales of the conv's input and weight, both stored
        assert all(name in stored for name in producers[dq.input[1]].input)
    # ONNX Runtime folds the Mul and still fuses the convs into integer kernels
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    fused = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    assert "QLinearConv" in ops and "Conv" not in ops
    # the file's semantics (no fusion) agree with the fused kernels
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    unfused = ort.InferenceSession(str(path), plain, providers=["CPUExecutionProvider"])
    a, b = fused.run(None, sample)[0], unfused.run(None, sample)[0]
    assert np.abs(a - b).max() <= 0.05 * np.abs(b).max()
    # loading keeps the Mul as written (import normalisation does not fold it), counts as before
    loaded = modelpress.load(path, show_progress=False)
    assert loaded.op_histogram().get("Mul", 0) == len(biases)
    assert loaded.parameter_count() == cnn.parameter_count() == result.parameter_count()


def test_the_file_records_only_options_off_their_defaults(tmp_path):
    _, result, path, _ = _quantized(tmp_path, calibrator="minmax")
    record = result.provenance.passes[-1]
    assert record.options["percentile"] == 99.999  # in memory: every option
    entry = {p.key: p.value for p in onnx.load(path).metadata_props}[PROVENANCE_KEY]
    compact = json.dumps(json.loads(entry), sort_keys=True, separators=(",", ":"))
    assert entry == compact  # no spaces between items
    written = json.loads(entry)["passes"][-1]["options"]
    assert written == {"calibrator": "minmax", "smoothquant": False}
    assert modelpress.load(path, show_progress=False).provenance.passes[-1].options == written


def test_the_same_run_writes_the_same_bytes(tmp_path):
    """A file's bytes depend on what was done, not on how long it took: two runs of the same
    quantization write identical files (the pass's duration stays in memory, not in the file)."""
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    _, result_a, path_a, _ = _quantized(first)
    path_b = _quantized(second)[2]
    assert result_a.provenance.passes[-1].seconds > 0  # measured, in memory
    assert path_a.read_bytes() == path_b.read_bytes()
    loaded = modelpress.load(path_a, show_progress=False).provenance.passes[-1]
    assert loaded.seconds == 0.0 and loaded.figures == result_a.provenance.passes[-1].figures


def test_export_verifies_the_file_as_ort_runs_it(tmp_path):
    """The written file's verification session runs it as a user's session does: with ORT's constant
    folding, which folds each int32 bias's Mul of scales so that the convs fuse into integer kernels
    (without it they stay DQ -> Conv -> Q, a different computation from the one users get)."""
    from modelpress.io.export import _output_session

    _, _, path, _ = _quantized(tmp_path)
    options = _output_session(path, path, prepack=True).get_session_options()
    with pytest.raises(
        RuntimeError, match="does not have configuration"
    ):  # NOTE: no optimizer turned off
        options.get_session_config_entry("optimization.disable_specified_optimizers")
