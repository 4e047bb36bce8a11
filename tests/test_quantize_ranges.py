"""int8-static's activation ranges and SmoothQuant's data guard, on real tensors and a real model: the
``mse`` calibrator's range has (close to) the least quantization error the data allows, and SmoothQuant
leaves alone a layer whose calibration rows are fewer than its input channels."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.plugins.quantize.affine import UINT8, affine_params, fake_quantize
from modelpress.plugins.quantize.calibrate import choose_range
from modelpress.plugins.quantize.static_select import few_rows
from modelpress.runtime.activations import TensorStats, observe
from modelpress.runtime.session import make_session, run
from tests.test_quantize_quality import _mlp


def _conv_output_like(rng: np.random.Generator) -> np.ndarray:
    """Pre-activation values as a CNN has them: a heavy-tailed bulk, its negative side 2.5x longer."""
    x = rng.laplace(0.1, 0.4, 200_000)
    return np.where(x < 0, 2.5 * x, x).astype(np.float32)


def _mse(x: np.ndarray, lo: float, hi: float) -> float:
    scale, zero = affine_params(lo, hi, UINT8)
    q = fake_quantize(x, np.float32(scale), np.asarray(zero, UINT8.dtype), UINT8)
    return float(np.mean((q.astype(np.float64) - x) ** 2))


@pytest.mark.parametrize("seed", [0, 1])
def test_mse_range_has_close_to_the_least_real_quantization_error(seed):
    rng = np.random.default_rng(seed)
    x = _conv_output_like(rng)
    stats = TensorStats()
    for part in np.array_split(x, 8):  # NOTE: observed in batches, as calibration does
        observe(stats, part, None, histogram=True)
    lo, hi = choose_range(stats, "mse")
    chosen = _mse(x, lo, hi)
    # NOTE: brute force over clipping thresholds on the data itself
    best = min(
        _mse(x, max(float(x.min()), -t), min(float(x.max()), t))
        for t in np.linspace(0.05, 1, 400) * float(np.abs(x).max())
    )
    # NOTE: the step of the asymmetric range each threshold gives (the estimate before it took T/127: 8 % worse here)
    assert chosen <= 1.02 * best
    assert chosen < 0.9 * _mse(x, float(x.min()), float(x.max()))  # NOTE: minmax wastes the grid
    assert lo < 0 < hi


def test_smoothquant_leaves_alone_layers_with_fewer_rows_than_channels(tmp_path):
    model, x, _ = _mlp(tmp_path)  # NOTE: x is [n, 64]: one row per sample
    assert set(few_rows(model, 16, ["MatMul"])) == {"fc1", "fc2"}  # NOTE: 64 and 128 channels
    assert set(few_rows(model, 100, ["MatMul"])) == {"fc2"}
    assert few_rows(model, 256, ["MatMul"]) == {}
    common = dict(sensitivity=False, show_progress=False, criteria={"y": "relative_error<=1"})
    few = modelpress.quantize(model, "int8-static", calibration={"x": x[:16]}, **common)
    figures = few.provenance.passes[-1].figures
    assert set(figures["smoothquant_skipped"]) == {"fc1", "fc2"}
    assert "16 calibration rows < 64 input channels" in figures["smoothquant_skipped"]["fc1"]
    assert not figures.get("smoothquant_alpha")
    # NOTE: what it leaves is exactly int8-static without SmoothQuant
    off = modelpress.quantize(
        model, "int8-static", calibration={"x": x[:16]}, smoothquant=False, **common
    )
    held = x[128:]
    outputs = [
        run(
            make_session(modelpress.export(m, tmp_path / f"{i}.onnx", verify=False).path),
            {"x": held},
        )[0]
        for i, m in enumerate((few, off))
    ]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    enough = modelpress.quantize(model, "int8-static", calibration={"x": x}, **common)
    figures = enough.provenance.passes[-1].figures
    assert "smoothquant_skipped" not in figures and figures["smoothquant_alpha"].get("fc1")


def test_few_rows_counts_the_static_middle_axes_and_trusts_symbolic_ones():
    from onnx import TensorProto, helper

    from modelpress.testing import make_model

    rng = np.random.default_rng(0)
    w = {"w": rng.normal(size=(32, 8)).astype(np.float32)}
    node = [helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")]

    def build(shape: list) -> modelpress.Model:
        return make_model(
            node,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*shape[:-1], 8])],
            dict(w),
        )

    assert (
        "16 calibration rows < 32 input channels"
        in few_rows(build(["n", 4, 32]), 4, ["MatMul"])["fc"]
    )
    assert few_rows(build(["n", 8, 32]), 4, ["MatMul"]) == {}  # NOTE: 32 rows, 32 channels
    assert few_rows(build(["n", "seq", 32]), 1, ["MatMul"]) == {}  # NOTE: unknown: not counted few
    assert few_rows(build(["n", 4, 32]), 4, ["Conv"]) == {}
