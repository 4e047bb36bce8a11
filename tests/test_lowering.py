"""IR -> torch lowering: each op family against ONNX Runtime on hand-built graphs."""

import numpy as np
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import make_model, tiny_cnn

torch = pytest.importorskip("torch", reason="needs the torch extra")
pytestmark = pytest.mark.torch

F = TensorProto.FLOAT
I64 = TensorProto.INT64
rng = np.random.default_rng(0)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _build(nodes, inputs, outputs, inits, opset=20):
    """make_model with output types filled in by ONNX shape inference (the checker wants them)."""
    import onnx
    from onnx import numpy_helper

    graph = helper.make_graph(
        nodes,
        "case",
        inputs,
        [helper.make_empty_tensor_value_info(n) for n, _ in outputs],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    done = onnx.shape_inference.infer_shapes(proto).graph
    inferred = {
        v.name: v
        for v in [*done.value_info, *(o for o in done.output if o.type.HasField("tensor_type"))]
    }
    typed = [inferred[n] for n, _ in outputs]
    return make_model(nodes, inputs, typed, inits, opset=opset)


def _compare(model, feeds, atol=1e-4):
    expected = run(make_session(model), feeds)
    module = modelpress.to_torch(model).eval()
    with torch.no_grad():
        got = module(*[torch.from_numpy(feeds[n]) for n in model.signature.input_names])
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got, strict=True):
        g = g.detach().numpy()
        assert e.shape == g.shape
        np.testing.assert_allclose(g.astype(np.float64), e.astype(np.float64), atol=atol, rtol=1e-4)


def _w(*shape):
    return rng.standard_normal(shape).astype(np.float32) * 0.5


CASES = {
    "conv_groups_asym_pads_pool": (
        [
            helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[0, 1, 1, 0], strides=[2, 1]),
            helper.make_node(
                "Conv", ["c1", "wd"], ["c2"], group=4, pads=[1, 1, 1, 1], dilations=[1, 1]
            ),
            helper.make_node("HardSwish", ["c2"], ["h"]),
            helper.make_node(
                "MaxPool", ["h"], ["p"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1
            ),
            helper.make_node(
                "AveragePool",
                ["p"],
                ["a"],
                kernel_shape=[2, 2],
                pads=[1, 1, 1, 1],
                count_include_pad=1,
            ),
            helper.make_node("GlobalMaxPool", ["a"], ["y"]),
        ],
        {"w1": _w(4, 2, 3, 3), "b1": _w(4), "wd": _w(4, 1, 3, 3)},
        {"x": (F, [2, 2, 9, 9])},
        [("y", F)],
    ),
    "conv_auto_pad_transpose": (
        [
            helper.make_node("Conv", ["x", "w1"], ["c1"], auto_pad="SAME_UPPER", strides=[2, 2]),
            helper.make_node(
                "ConvTranspose",
                ["c1", "wt", "bt"],
                ["t"],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                output_padding=[1, 1],
            ),
            helper.make_node("LeakyRelu", ["t"], ["y"], alpha=0.2),
        ],
        {"w1": _w(3, 2, 3, 3), "wt": _w(3, 2, 3, 3), "bt": _w(2)},
        {"x": (F, [1, 2, 7, 7])},
        [("y", F)],
    ),
    "batchnorm_activations": (
        [
            helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
            helper.make_node("Sigmoid", ["bn"], ["s1"]),
            helper.make_node("Tanh", ["bn"], ["t1"]),
            helper.make_node("Clip", ["bn", "lo", "hi"], ["c1"]),
            helper.make_node("HardSigmoid", ["bn"], ["hs"]),
            helper.make_node("Sum", ["s1", "t1", "c1", "hs"], ["y"]),
        ],
        {
            "s": _w(3) + 1,
            "b": _w(3),
            "m": _w(3),
            "v": np.abs(_w(3)) + 0.5,
            "lo": np.float32(-0.5),
            "hi": np.float32(0.7),
        },
        {"x": (F, [2, 3, 4, 4])},
        [("y", F)],
    ),
    "transformer_ops": (
        [
            helper.make_node("MatMul", ["x", "wq"], ["q"]),
            helper.make_node("Shape", ["q"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
            helper.make_node("Unsqueeze", ["batch", "axis0"], ["batch1"]),
            helper.make_node("Concat", ["batch1", "rest"], ["newshape"], axis=0),
            helper.make_node("Reshape", ["q", "newshape"], ["heads"]),
            helper.make_node("Transpose", ["heads"], ["ht"], perm=[0, 2, 1, 3]),
            helper.make_node("MatMul", ["ht", "ht_t"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["attn"], axis=-1),
            helper.make_node("ReduceMean", ["attn", "axes_last"], ["red"], keepdims=0),
            helper.make_node(
                "LayerNormalization", ["x", "ln_s", "ln_b"], ["ln"], axis=-1, epsilon=1e-5
            ),
            helper.make_node("Gelu", ["ln"], ["g"]),
            helper.make_node("Div", ["g", "two"], ["g2"]),
            helper.make_node("Pow", ["g2", "two"], ["p2"]),
            helper.make_node("Sqrt", ["p2"], ["sq"]),
            helper.make_node("Erf", ["sq"], ["erf"]),
            helper.make_node("Sub", ["erf", "two"], ["y2"]),
            helper.make_node("Slice", ["y2", "starts", "ends", "axes_last", "steps"], ["y3"]),
            helper.make_node("Squeeze", ["red_keep"], ["y4"]),
        ],
        {
            "wq": _w(8, 8),
            "zero": np.array(0, np.int64),
            "axis0": np.array([0], np.int64),
            "rest": np.array([5, 2, 4], np.int64),
            "ht_t": _w(4, 5),
            "axes_last": np.array([-1], np.int64),
            "ln_s": _w(8) + 1,
            "ln_b": _w(8),
            "two": np.float32(2.0),
            "starts": np.array([7], np.int64),
            "ends": np.array([-100], np.int64),
            "steps": np.array([-2], np.int64),
            "red_keep": _w(3, 1, 4),
        },
        {"x": (F, [3, 5, 8])},
        [("red", F), ("y2", F), ("y3", F), ("y4", F)],
    ),
    "shape_and_logic": (
        [
            helper.make_node(
                "ConstantOfShape",
                ["cshape"],
                ["ones"],
                value=helper.make_tensor("v", F, [1], [1.0]),
            ),
            helper.make_node("Expand", ["x", "eshape"], ["ex"]),
            helper.make_node("Add", ["ex", "ones"], ["a"]),
            helper.make_node("Range", ["r0", "r1", "r2"], ["rng"]),
            helper.make_node("Cast", ["rng"], ["rngf"], to=F),
            helper.make_node("Mul", ["a", "rngf"], ["m"]),
            helper.make_node("Greater", ["m", "zerof"], ["gt"]),
            helper.make_node("Equal", ["rng", "r1m"], ["eq"]),
            helper.make_node("Or", ["gt", "eq"], ["cond"]),
            helper.make_node("Neg", ["m"], ["negm"]),
            helper.make_node("Where", ["cond", "m", "negm"], ["w"]),
            helper.make_node("Flatten", ["w"], ["y"], axis=1),
            helper.make_node(
                "Constant", [], ["k"], value=helper.make_tensor("k", F, [4], [1, 2, 3, 4])
            ),
            helper.make_node("Tile", ["k", "reps"], ["kt"]),
            helper.make_node("Split", ["kt", "splits"], ["s1", "s2"], axis=0),
            helper.make_node("Min", ["s1", "s2"], ["y2"]),
        ],
        {
            "cshape": np.array([2, 3, 4], np.int64),
            "eshape": np.array([2, 1, 1], np.int64),
            "r0": np.array(0, np.int64),
            "r1": np.array(4, np.int64),
            "r2": np.array(1, np.int64),
            "zerof": np.float32(0.5),
            "r1m": np.array(3, np.int64),
            "reps": np.array([2], np.int64),
            "splits": np.array([4, 4], np.int64),
        },
        {"x": (F, [1, 3, 4])},
        [("y", F), ("y2", F)],
    ),
    "gemm_variants": (
        [
            helper.make_node("Gemm", ["x", "wa", "ba"], ["g1"], alpha=0.5, beta=2.0, transB=1),
            helper.make_node("Gemm", ["g1", "wb"], ["g2"], transA=0),
            helper.make_node("Pad", ["g2", "pads", "pval"], ["y"]),
        ],
        {
            "wa": _w(6, 5),
            "ba": _w(6),
            "wb": _w(6, 3),
            "pads": np.array([0, 1, 0, 2], np.int64),
            "pval": np.float32(0.25),
        },
        {"x": (F, [4, 5])},
        [("y", F)],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ops_match_onnxruntime(case):
    nodes, inits, inputs, outputs = CASES[case]
    model = _build(nodes, [_vi(n, t, s) for n, (t, s) in inputs.items()], outputs, inits)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, (t, s) in inputs.items()}
    _compare(model, feeds)


def test_quantize_dequantize_is_fake_quant_matching_ort():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["wq", "sw", "zw"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"]),
    ]
    inits = {
        "sx": np.float32(0.02),
        "zx": np.uint8(128),
        "wq": rng.integers(-127, 127, (4, 2, 3, 3)).astype(np.int8),
        "sw": np.abs(_w(4)) / 50,
        "zw": np.zeros(4, np.int8),
    }
    model = _build(nodes, [_vi("x", F, [1, 2, 6, 6])], [("y", F)], inits)
    feeds = {"x": rng.standard_normal((1, 2, 6, 6)).astype(np.float32)}
    _compare(model, feeds, atol=1e-4)
    # straight-through estimator: gradients flow through the rounding
    module = modelpress.to_torch(model)
    x = torch.from_numpy(feeds["x"]).requires_grad_(True)
    module(x).sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_parameters_keep_onnx_names_and_weights_go_back():
    model = tiny_cnn(
        normalize=False
    )  # NOTE: keeps its BatchNormalization (statistics must become buffers)
    module = modelpress.to_torch(model)
    names = set(module.onnx_names.values())
    assert {"conv1.weight", "fc.bias", "bn1.scale"} <= names
    params = {module.onnx_names[k] for k, _ in module.named_parameters()}
    assert "bn1.mean" not in params and "bn1.var" not in params  # running statistics are buffers
    with torch.no_grad():
        module.tensor("fc.bias").add_(1.0)
    updated = modelpress.update_weights(model, module)
    np.testing.assert_allclose(
        updated.initializer("fc.bias").const_value.numpy(),
        model.initializer("fc.bias").const_value.numpy() + 1.0,
        rtol=1e-6,
    )
    assert (
        updated.initializer("conv1.weight").const_value
        is model.initializer("conv1.weight").const_value
    )  # unchanged: shared
    assert np.all(
        model.initializer("fc.bias").const_value.numpy()
        == tiny_cnn().initializer("fc.bias").const_value.numpy()
    )


def test_unsupported_ops_are_all_listed():
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk_1"),
        helper.make_node("NonZero", ["v"], ["nz"], name="nz_1"),
        helper.make_node("TopK", ["x", "k"], ["v2", "i2"], name="topk_2"),
        helper.make_node("Relu", ["v2"], ["y"]),
    ]
    model = _build(
        nodes, [_vi("x", F, [2, 5])], [("nz", I64), ("y", F)], {"k": np.array([2], np.int64)}
    )
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"2 unsupported op type\(s\): NonZero \(nodes: nz_1\); TopK \(nodes: topk_1, topk_2\)",
    ):
        modelpress.to_torch(model)
