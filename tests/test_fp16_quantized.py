"""fp16 on a model that is already quantized: Q/DQ scales and zero points stay float32, ORT runs the file."""

import numpy as np
import onnx_ir as ir

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import tiny_cnn


def test_fp16_after_int8_static_exports_and_runs_in_ort(tmp_path):
    model = tiny_cnn(channels=8)
    x = np.random.default_rng(0).standard_normal((32, 1, 8, 8)).astype(np.float32)
    quantized = modelpress.quantize(
        model,
        "int8-static",
        calibration={"x": x},
        sensitivity=False,
        show_progress=False,
        allow_no_gain=True,
    )
    half = modelpress.quantize(quantized, "fp16", show_progress=False, allow_no_gain=True)
    qdq = [n for n in half.nodes() if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq, "the int8 model keeps its Q/DQ nodes"
    for node in qdq:  # opset < 19: ORT accepts float32 scales only
        assert node.inputs[1].dtype == ir.DataType.FLOAT, (node.name, node.inputs[1].name)
        assert node.outputs[0].dtype != ir.DataType.FLOAT16 or node.op_type == "QuantizeLinear"
    assert any(
        n.outputs[0].dtype == ir.DataType.FLOAT16 for n in half.nodes() if n.op_type == "Conv"
    )
    exported = modelpress.export(half, tmp_path / "q16.onnx", sample={"x": x[:8]})
    out = run(make_session(tmp_path / "q16.onnx"), {"x": x[:8]})[0]
    ref = run(make_session(modelpress.export(model, tmp_path / "f32.onnx").path), {"x": x[:8]})[0]
    cosine = float(ref.ravel() @ out.ravel() / (np.linalg.norm(ref) * np.linalg.norm(out)))
    assert cosine > 0.99 and exported.verification.cosine > 0.99
