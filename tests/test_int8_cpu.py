"""Int8 that is right on the CPU it runs on: where ONNX Runtime's u8 x s8 kernels saturate (x86
without VNNI), 7-bit weights (``reduce_range``) for int8-qat, and for int8-static and int8-dynamic
8-bit scales widened only as far as no pair of codes can saturate; today's 8-bit weights elsewhere.

This machine may well have VNNI: ``MODELPRESS_INT8_VNNI`` forces either answer, and a numpy model of
AVX2's ``vpmaddubsw`` (two u8 x s8 products summed into a saturated int16) shows what the choice buys.
"""

import numpy as np
import onnx_ir as ir
import pytest
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

import modelpress
from modelpress.data.samples import sample_inputs
from modelpress.plugins.quantize import cpu
from modelpress.runtime.session import make_session, run
from modelpress.testing import tiny_cnn, tiny_mlp
from tests.conftest import run_cli_here


def _graph_bytes(model):
    proto = model.to_proto()
    del proto.metadata_props[
        :
    ]  # NOTE: the provenance records the options and timings, not the graph
    return proto.SerializeToString()


def _dynamic(model, **options):
    return modelpress.quantize(
        model, "int8-dynamic", min_elements=16, show_progress=False, allow_no_gain=True, **options
    )


def _int8_weights(model, op_type):
    """The int8 weight initializers of the ``op_type`` nodes (MatMulInteger: input 1; DequantizeLinear: input 0)."""
    index = 1 if op_type == "MatMulInteger" else 0
    return [
        node.inputs[index].const_value.numpy()
        for node in model.graph
        if node.op_type == op_type
        and node.inputs[index].const_value is not None
        and node.inputs[index].const_value.dtype == ir.DataType.INT8
    ]


def _cosine(a, b):
    return float(
        np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    )


# -- the probe ------------------------------------------------------------------------------------
@pytest.fixture
def fresh_probe():
    cpu._probe.cache_clear()
    yield
    cpu._probe.cache_clear()


@pytest.mark.parametrize(
    ("value", "saturates"), [("0", True), ("1", False), ("false", True), ("true", False)]
)
def test_the_environment_forces_either_answer(monkeypatch, value, saturates):
    monkeypatch.setenv(cpu.ENV_VAR, value)
    answer = cpu.u8s8_saturates()
    assert answer.saturates is saturates and f"{cpu.ENV_VAR}={value}" in answer.why


@pytest.mark.parametrize(
    ("machine", "system", "flags", "saturates", "why"),
    [
        ("x86_64", "Linux", {"avx2", "fma"}, True, "CPU without VNNI: u8s8 kernels saturate"),
        ("x86_64", "Linux", {"avx2", "avx512_vnni"}, False, "CPU with avx512_vnni"),
        ("AMD64", "Linux", {"avx2", "avx_vnni"}, False, "CPU with avx_vnni"),
        ("x86_64", "Linux", None, True, "x86 CPU whose VNNI support is unknown"),
        ("aarch64", "Linux", None, False, "aarch64 CPU"),
        ("arm64", "Darwin", None, False, "arm64 CPU"),
    ],
)
def test_the_probe_reads_the_cpu_flags(
    monkeypatch, fresh_probe, machine, system, flags, saturates, why
):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu.platform, "machine", lambda: machine)
    monkeypatch.setattr(cpu.platform, "system", lambda: system)
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: flags)
    monkeypatch.setattr(cpu, "_numpy_flags", lambda: None)
    answer = cpu.u8s8_saturates()
    assert answer.saturates is saturates and why in answer.why
    monkeypatch.setattr(cpu, "_cpuinfo_flags", lambda: pytest.fail("the probe is cached"))
    assert cpu.u8s8_saturates() == answer


def test_this_machines_cpuinfo_parses(monkeypatch, fresh_probe):
    monkeypatch.delenv(cpu.ENV_VAR, raising=False)
    if cpu.platform.system() != "Linux" or cpu.platform.machine().lower() not in cpu._X86:
        pytest.skip("reads /proc/cpuinfo on x86 Linux")
    flags = cpu._cpuinfo_flags()
    assert flags and "sse2" in flags
    assert cpu.u8s8_saturates().saturates is not any(
        f in flags for f in ("avx512_vnni", "avx_vnni", "amx_int8")
    )


# -- int8-dynamic ---------------------------------------------------------------------------------
class MatMulInteger(OpRun):  # NOTE: the reference evaluator replaces the op of the class's name
    """The op as x86 AVX2 (no VNNI) computes it: raw u8 x s8 products, adjacent pairs along K
    summed into a saturated int16, then into int32; the zero points are corrected afterwards."""

    op_domain = ""

    def _run(self, a, b, a_zero_point=None, b_zero_point=None):  # type: ignore[no-untyped-def]
        A, B = a.astype(np.int32), b.astype(np.int32)
        if A.shape[-1] % 2:
            A, B = np.pad(A, [(0, 0), (0, 1)]), np.pad(B, [(0, 1), (0, 0)])
        products = A[:, :, None] * B[None, :, :]
        acc = np.clip(products[:, 0::2] + products[:, 1::2], -(2**15), 2**15 - 1).sum(axis=1)
        az = int(a_zero_point) if a_zero_point is not None else 0
        bz = b_zero_point.astype(np.int32) if b_zero_point is not None else 0
        return (
            (
                acc - az * B.sum(axis=0) - A.sum(axis=1, keepdims=True) * bz + az * bz * A.shape[1]
            ).astype(np.int32),
        )


def _pair_loads(w):
    """The largest int16 sum each same-signed pair of neighbouring rows of an int8 ``[K, N]`` weight
    reaches on uint8 inputs up to 255."""
    a, b = w[0 : len(w) // 2 * 2 : 2].astype(np.int64), w[1::2][: len(w) // 2].astype(np.int64)
    return np.where(a * b > 0, 255 * (np.abs(a) + np.abs(b)), 0)


def test_without_vnni_int8_dynamic_keeps_8_bit_scales_that_cannot_saturate(monkeypatch):
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    model = tiny_mlp()
    result = _dynamic(model)
    figure = result.provenance.passes[-1].figures["reduce_range"]
    assert figure.startswith(
        "true (MODELPRESS_INT8_VNNI=0: CPU taken to lack VNNI, u8s8 kernels saturate); "
        "but 8-bit scales for 2 MatMul/Gemm weight(s), "
    )
    weights = _int8_weights(result, "MatMulInteger")
    assert len(weights) == 2
    assert all(_pair_loads(w).max() <= 2**15 - 1 for w in weights)
    assert any(np.abs(w).max() > 63 for w in weights)  # more than 7 bits where pairs allow
    feeds = {"x": np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32) * 3}
    assert (
        _cosine(run(make_session(result), feeds)[0], run(make_session(model), feeds)[0]) >= 0.99
    )  # on this CPU


def test_7_bit_weights_cannot_saturate_avx2s_int16_pairs(monkeypatch):
    """On the AVX2 model of the kernel, the 7-bit result and the pair-safe 8-bit one (the default
    without VNNI) are exactly the exact integer result; the plain 8-bit one is not (255 x 127 x 2
    overflows int16): what broke the CLI test on an AMD EPYC. The pair-safe scales are closer to
    the float model than 7 bits."""
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    model = tiny_mlp()
    feeds = {"x": np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32) * 3}
    (expected,) = ReferenceEvaluator(model.to_proto()).run(None, feeds)
    outputs = {}
    for reduce_range in (True, False, None):
        proto = _dynamic(model, reduce_range=reduce_range).to_proto()
        exact = ReferenceEvaluator(proto).run(None, feeds)[0]
        avx2 = ReferenceEvaluator(proto, new_ops=[MatMulInteger]).run(None, feeds)[0]
        outputs[reduce_range] = (exact, avx2)
    assert np.array_equal(*outputs[True])
    assert not np.array_equal(*outputs[False])
    assert np.array_equal(*outputs[None])
    assert _cosine(outputs[None][1], expected) > _cosine(outputs[True][1], expected)


def test_with_vnni_int8_dynamic_is_unchanged(monkeypatch):
    model = tiny_mlp()
    monkeypatch.setenv(cpu.ENV_VAR, "1")
    vnni = _dynamic(model)
    assert (
        vnni.provenance.passes[-1].figures["reduce_range"]
        == "false (MODELPRESS_INT8_VNNI=1: CPU taken to have VNNI)"
    )
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    full = _dynamic(model, reduce_range=False)  # the option wins over the CPU
    assert full.provenance.passes[-1].figures["reduce_range"] == "false (set by option)"
    assert _graph_bytes(vnni) == _graph_bytes(full)
    assert max(int(np.abs(w).max()) for w in _int8_weights(vnni, "MatMulInteger")) == 127
    monkeypatch.setenv(cpu.ENV_VAR, "1")
    reduced = _dynamic(model, reduce_range=True)
    assert reduced.provenance.passes[-1].figures["reduce_range"] == "true (set by option)"
    assert max(int(np.abs(w).max()) for w in _int8_weights(reduced, "MatMulInteger")) == 63


def test_int8_dynamic_keeps_weight_only_tables_and_convs_8_bit(monkeypatch):
    """Conv weights behind a DequantizeLinear run in float: no integer kernel, nothing to saturate."""
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    result = modelpress.quantize(
        tiny_cnn(), "int8-dynamic", min_elements=16, show_progress=False, allow_no_gain=True
    )
    assert max(int(np.abs(w).max()) for w in _int8_weights(result, "DequantizeLinear")) == 127


def test_the_cli_takes_reduce_range(tmp_path):
    path = tmp_path / "m.onnx"
    modelpress.export(tiny_mlp(), path)
    done = run_cli_here(
        "apply",
        str(path),
        "-m",
        "int8-dynamic",
        "-O",
        "min_elements=16",
        "-O",
        "reduce_range=true",
        "--allow-no-gain",
        "-o",
        str(tmp_path / "q.onnx"),
        "-q",
        env={cpu.ENV_VAR: "1"},
    )
    assert done.returncode == 0, done.stderr
    written = modelpress.load(tmp_path / "q.onnx")
    assert written.provenance.passes[-1].figures["reduce_range"] == "true (set by option)"
    assert max(int(np.abs(w).max()) for w in _int8_weights(written, "MatMulInteger")) == 63


# -- int8-static and int8-qat ---------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "1"])
def test_int8_static_follows_the_cpu(monkeypatch, value):
    monkeypatch.setenv(cpu.ENV_VAR, value)
    calibration = {"x": np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)}
    result = modelpress.quantize(
        tiny_cnn(),
        "int8-static",
        calibration=calibration,
        show_progress=False,
        allow_no_gain=True,
        min_agreement=None,
        min_cosine=None,
        max_relative_error=None,
    )
    figure = result.provenance.passes[-1].figures["reduce_range"]
    assert figure.startswith("true (" if value == "0" else "false (")
    # NOTE: without VNNI every weight keeps 8-bit scales, kept from saturating: a Conv's on any input
    # (below), the Gemm's on its calibrated ones (test_int8_static_keeps_8_bit_gemm_weights_that_cannot_saturate)
    assert ("but 8-bit scales for 3 MatMul/Gemm/Conv weight(s)" in figure) is (value == "0")
    assert len(_int8_weights(result, "DequantizeLinear")) == 3
    for name in ("conv1", "conv2"):
        codes = result.initializer(f"{name}.weight_q").const_value.numpy().astype(np.int32)
        assert int(np.abs(codes).max()) > 63  # NOTE: finer than the 7-bit grid ORT advises
        # K as QLinearConv adds it: input channels neighbouring at one kernel position
        rows = np.moveaxis(codes, (0, 1), (-1, -2)).reshape(-1, codes.shape[0])
        assert bool(_pair_loads(rows).max() <= 2**15 - 1) is (value == "0"), name
    sample = sample_inputs(result.signature, batch=2)
    assert np.all(np.isfinite(run(make_session(result), sample)[0]))


def _avx2_products(u: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``u @ w`` (uint8 codes [N, K] x int8 codes [K, M]) exactly, and as AVX2 adds it: the products
    of neighbours along K summed into a saturated int16 first."""
    products = u.astype(np.int32)[:, :, None] * w.astype(np.int32)[None, :, :]
    even = products[:, 0::2]
    odd = np.pad(
        products[:, 1::2], [(0, 0), (0, even.shape[1] - products[:, 1::2].shape[1]), (0, 0)]
    )
    return products.sum(axis=1), np.clip(even + odd, -(2**15), 2**15 - 1).sum(axis=1)


def test_int8_static_keeps_8_bit_gemm_weights_that_cannot_saturate(monkeypatch):
    """Without VNNI, int8-static keeps a Gemm's 8-bit scales, each output channel's widened only as far
    as its codes need: on the calibrated inputs, the AVX2 sum is the exact one, where the VNNI file's
    codes overflow int16 on the same inputs; and more of the 8-bit grid is used than 7 bits give."""
    x = np.random.default_rng(1).standard_normal((256, 8)).astype(np.float32) * 3
    codes = {}
    for value in ("0", "1"):
        monkeypatch.setenv(cpu.ENV_VAR, value)
        result = modelpress.quantize(
            tiny_mlp(),
            "int8-static",
            calibration={"x": x},
            sensitivity=False,
            smoothquant=False,
            show_progress=False,
            allow_no_gain=True,
        )
        quantize_x = next(
            n for n in result.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"
        )
        scale, zero = (v.const_value.numpy() for v in quantize_x.inputs[1:3])
        u = np.clip(np.round(x / scale) + zero.astype(np.int32), 0, 255)
        w = result.initializer("fc1.weight_q").const_value.numpy().T  # NOTE: Gemm transB: [K, M]
        codes[value] = (u, w, result.provenance.passes[-1].figures["reduce_range"])
    u, w, figure = codes["0"]
    assert "but 8-bit scales for 2 MatMul/Gemm/Conv weight(s)" in figure
    assert 63 < int(np.abs(w).max()) <= 127
    exact, avx2 = _avx2_products(u, w)
    assert np.array_equal(exact, avx2)
    exact, avx2 = _avx2_products(codes["1"][0], codes["1"][1])
    assert not np.array_equal(exact, avx2)


@pytest.mark.torch
def test_int8_qat_folds_back_into_7_bits(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    x = np.random.default_rng(0).standard_normal((64, 1, 8, 8)).astype(np.float32)
    # NOTE: a large learning rate: trained weights leave the 7-bit grid (QuantizeLinear saturates at int8's) and are clipped back
    result = modelpress.apply(
        tiny_cnn(),
        "int8-qat",
        kind="quantize",
        calibration={"x": x},
        train={"x": x},
        epochs=1,
        lr=0.5,
        show_progress=False,
        allow_no_gain=True,
        min_agreement=None,
        min_cosine=None,
        max_relative_error=None,
    )
    figures = result.provenance.passes[-1].figures
    assert figures["trained_weights"] == 3 and figures["reduce_range"].startswith("true (")
    assert max(int(np.abs(w).max()) for w in _int8_weights(result, "DequantizeLinear")) == 63


def _qdq_conv(weight_codes: np.ndarray, group: int, size: int, out_scale: float):
    """``x -> Q/DQ (scale 1, zero point 0) -> Conv(DQ(weight_codes), group) -> Q/DQ(out_scale)``,
    which ONNX Runtime fuses into a QLinearConv."""
    from onnx import TensorProto, helper, numpy_helper

    channels = weight_codes.shape[1] * group
    consts = {
        "w": weight_codes,
        "one": np.array(1.0, np.float32),
        "zero": np.array(0, np.uint8),
        "ys": np.array(out_scale, np.float32),
    }
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "one", "zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "one", "zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "one"], ["wd"]),
        helper.make_node("Conv", ["xd", "wd"], ["y"], group=group, kernel_shape=[3, 3]),
        helper.make_node("QuantizeLinear", ["y", "ys", "zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "ys", "zero"], ["out"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("per_group", [1, 2])
def test_ort_sums_a_depthwise_convs_products_in_int32(per_group):
    """What lets int8-static keep a depthwise Conv's weights in full 8 bits on any CPU: ORT's
    depthwise kernel (one output channel per group) is exact with codes of 127 on inputs of 255;
    two output channels per group take ORT's grouped path, whose int16 pairs saturate without
    VNNI (and are exact with it)."""
    import onnxruntime as ort

    channels = 8
    codes = np.full((channels * per_group, 1, 3, 3), 127, np.int8)
    exact = 9 * 255 * 127  # every output
    proto = _qdq_conv(codes, channels, 6, out_scale=float(exact) / 200)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.full((1, channels, 6, 6), 255.0, np.float32)})
    assert out.shape == (1, channels * per_group, 4, 4)
    if per_group == 1 or not cpu.u8s8_saturates().saturates:
        assert np.allclose(out, exact, rtol=0.01)
    else:
        assert np.all(out < 0.9 * exact)  # 4 saturated pairs and one product: 163,452


def test_int8_static_keeps_depthwise_conv_weights_8_bit(monkeypatch):
    """Without VNNI a depthwise Conv's weights use the whole 8-bit grid (no pair to saturate), a
    grouped Conv with two output channels per group stays 7-bit; the figure says so."""
    from onnx import TensorProto, helper

    from modelpress.testing import make_model

    rng = np.random.default_rng(0)
    inits = {
        "dw.weight": (rng.standard_normal((4, 1, 3, 3)) / 3).astype(np.float32),
        "gw.weight": (rng.standard_normal((8, 1, 3, 3)) / 3).astype(np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "dw.weight"], ["d"], name="dw", group=4, pads=[1] * 4),
        helper.make_node("Relu", ["d"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "gw.weight"], ["y"], name="gw", group=4, pads=[1] * 4),
    ]
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 8, 8])],
        inits,
    )
    monkeypatch.setenv(cpu.ENV_VAR, "0")
    calibration = {"x": rng.standard_normal((32, 4, 8, 8)).astype(np.float32)}
    result = modelpress.quantize(
        model,
        "int8-static",
        calibration=calibration,
        sensitivity=False,
        show_progress=False,
        allow_no_gain=True,
    )
    figure = result.provenance.passes[-1].figures["reduce_range"]
    assert (
        "but 8-bit scales for 1 MatMul/Gemm/Conv weight(s), 0 output channel(s) widened" in figure
    )
    assert "a depthwise Conv's products ORT sums in int32: full 8 bits" in figure
    depthwise = result.initializer("dw.weight_q").const_value.numpy()
    grouped = result.initializer("gw.weight_q").const_value.numpy()
    assert int(np.abs(depthwise).max()) == 127
    assert int(np.abs(grouped).max()) == 63
