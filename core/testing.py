"""Helpers for plugin authors' tests: tiny models, and checks that a method keeps a model valid.

::

    from modelpress.testing import check_method, tiny_cnn

    def test_my_method():
        result = check_method("my-method", tiny_cnn(), strength=0.5)
        assert result.provenance.passes[-1].figures["changed"] > 0
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress.app.pipeline import apply, check_result
from modelpress.data.samples import sample_inputs
from modelpress.ir.model import Model
from modelpress.plugin.methods import Method
from modelpress.plugin.registry import Registry, get_registry
from modelpress.runtime.session import make_session, run

__all__ = ["assert_valid", "check_adapter", "check_method", "make_model", "tiny_cnn", "tiny_mlp"]

OPSET = 17


def make_model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: dict[str, np.ndarray],
    *,
    name: str = "tiny",
    opset: int = OPSET,
    normalize: bool = True,
) -> Model:
    """Build a validated :class:`Model` from ONNX helper objects and numpy initializers
    (``normalize=False``: as written, e.g. to keep a BatchNormalization a test is about)."""
    # NOTE: the ONNX adapter through the registry, not modelpress.adapters (layer contract)
    from modelpress.plugin.loading import load

    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        outputs,
        [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="modelpress.testing"
    )
    proto.ir_version = 8
    return load(proto, framework="onnx", normalize=normalize, show_progress=False)


def tiny_mlp(in_features: int = 8, hidden: int = 16, classes: int = 4, *, seed: int = 0) -> Model:
    """``x[N, in] -> Gemm -> Relu -> Gemm -> logits[N, classes]`` with random weights."""
    rng = np.random.default_rng(seed)
    inits = {
        "fc1.weight": (rng.standard_normal((hidden, in_features)) / np.sqrt(in_features)).astype(
            np.float32
        ),
        "fc1.bias": (0.1 * rng.standard_normal(hidden)).astype(np.float32),
        "fc2.weight": (rng.standard_normal((classes, hidden)) / np.sqrt(hidden)).astype(np.float32),
        "fc2.bias": (0.1 * rng.standard_normal(classes)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["h_relu"], name="relu1"),
        helper.make_node(
            "Gemm", ["h_relu", "fc2.weight", "fc2.bias"], ["logits"], name="fc2", transB=1
        ),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
        name="tiny_mlp",
    )


def tiny_cnn(
    channels: int = 4,
    size: int = 8,
    classes: int = 3,
    *,
    in_channels: int = 1,
    seed: int = 0,
    normalize: bool = True,
) -> Model:
    """``x[N, C, H, W] -> Conv -> BatchNorm -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm``
    (imported as users' models are: the BatchNorm is folded into the Conv unless ``normalize=False``)."""
    rng = np.random.default_rng(seed)
    c2 = channels * 2
    inits = {
        "conv1.weight": (rng.standard_normal((channels, in_channels, 3, 3)) / 3).astype(np.float32),
        "conv1.bias": (0.1 * rng.standard_normal(channels)).astype(np.float32),
        "bn1.scale": (1 + 0.1 * rng.standard_normal(channels)).astype(np.float32),
        "bn1.bias": (0.1 * rng.standard_normal(channels)).astype(np.float32),
        "bn1.mean": (0.1 * rng.standard_normal(channels)).astype(np.float32),
        "bn1.var": (1 + 0.1 * rng.random(channels)).astype(np.float32),
        "conv2.weight": (rng.standard_normal((c2, channels, 3, 3)) / np.sqrt(9 * channels)).astype(
            np.float32
        ),
        "conv2.bias": (0.1 * rng.standard_normal(c2)).astype(np.float32),
        "fc.weight": (rng.standard_normal((classes, c2)) / np.sqrt(c2)).astype(np.float32),
        "fc.bias": (0.1 * rng.standard_normal(classes)).astype(np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]
        ),
        helper.make_node(
            "BatchNormalization",
            ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"],
            ["b1"],
            name="bn1",
        ),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_channels, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        inits,
        name="tiny_cnn",
        normalize=normalize,
    )


def assert_valid(model: Model, *, sample: dict[str, np.ndarray] | None = None) -> list[np.ndarray]:
    """The model passes the ONNX checker, loads in ONNX Runtime and gives finite outputs; returns them."""
    onnx.checker.check_model(model.to_proto(), full_check=True)
    outputs = run(make_session(model), sample or sample_inputs(model.signature, batch=2))
    for spec, out in zip(model.signature.outputs, outputs, strict=True):
        if np.issubdtype(out.dtype, np.floating):
            assert np.all(np.isfinite(out)), f"output {spec.name!r} has non-finite values"
    return outputs


def check_method(
    method: str | Method,
    model: Model,
    *,
    kind: str | None = None,
    registry: Registry | None = None,
    calibration: Any = None,
    train: Any = None,
    **options: Any,
) -> Model:
    """Apply ``method`` and assert what every method owes its users; returns the result.

    * the data the method declares it needs is given (else :class:`modelpress.DataError`);
    * the input model is unchanged (byte-identical serialisation);
    * the result is a valid graph: the checks :func:`modelpress.apply` runs on every pass result
      (ONNX checker per node, topological order, no dangling input, no dead node), a failure being a
      :class:`modelpress.PluginError` naming the plugin and method; then the full ONNX checker;
    * the result runs in ORT with finite outputs;
    * inputs and outputs keep their names, and outputs their shapes;
    * the result's provenance records the pass.
    """
    before = model.to_proto().SerializeToString()
    sample = sample_inputs(model.signature, batch=2)
    expected = run(make_session(model), sample)
    result = apply(
        model,
        method,
        kind=kind,
        registry=registry,
        calibration=calibration,
        train=train,
        show_progress=False,
        **options,
    )
    assert model.to_proto().SerializeToString() == before, "the method changed its input model"
    m = method if isinstance(method, Method) else (registry or get_registry()).method(method, kind)
    check_result(
        m, model, result
    )  # NOTE: apply ran it already; kept explicit: it is part of the contract
    outputs = assert_valid(result, sample=sample)
    assert result.signature.input_names == model.signature.input_names, "input names changed"
    assert result.signature.output_names == model.signature.output_names, "output names changed"
    for exp, out in zip(expected, outputs, strict=True):
        assert exp.shape == out.shape, f"output shape changed from {exp.shape} to {out.shape}"
    assert result.provenance.passes and result.provenance.passes[-1].method == (
        method if isinstance(method, str) else method.name
    )
    return result


def check_adapter(
    source: Any,
    *,
    framework: str | None = None,
    registry: Registry | None = None,
    feeds: dict[str, np.ndarray] | None = None,
    expected: list[np.ndarray] | None = None,
    rtol: float = 1e-4,
    **load_options: Any,
) -> Model:
    """Load ``source`` as a user would (``modelpress.load``) and assert what every adapter owes its
    users; returns the model.

    * an adapter of the registry accepts ``source`` (``framework``, if given, is the one chosen);
    * the result is a :class:`Model` that passes the ONNX checker and runs in ORT with finite outputs;
    * its provenance names the source framework and the importer;
    * with ``feeds`` and ``expected`` (the source framework's own outputs on those inputs), the
      ONNX outputs match within ``rtol`` (relative to each output's largest magnitude);
    * loading twice gives the same graph (the adapter does not depend on hidden state).
    """
    from modelpress.plugin.loading import load

    model = load(
        source, framework=framework, registry=registry, show_progress=False, **load_options
    )
    assert isinstance(model, Model), (
        f"the adapter returned {type(model).__name__}, not a modelpress.Model"
    )
    assert model.provenance.source_framework, (
        "the adapter left provenance.source_framework empty (say which framework it read)"
    )
    assert model.provenance.importer, (
        "the adapter left provenance.importer empty (say what converted the model)"
    )
    outputs = assert_valid(model, sample=feeds)
    if expected is not None:
        assert feeds is not None, "expected outputs need the feeds they were computed on"
        assert len(outputs) == len(expected), (
            f"{len(outputs)} outputs, the source framework gave {len(expected)}"
        )
        for spec, out, ref in zip(model.signature.outputs, outputs, expected, strict=True):
            ref = np.asarray(ref)
            assert out.shape == ref.shape, (
                f"output {spec.name!r}: shape {out.shape}, the source framework gave {ref.shape}"
            )
            scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1.0)
            diff = (
                float(np.max(np.abs(out.astype(np.float64) - ref.astype(np.float64))))
                if ref.size
                else 0.0
            )
            assert diff <= rtol * scale, (
                f"output {spec.name!r} differs from the source framework by {diff:.3g} (> {rtol:g} x {scale:.3g})"
            )
    again = load(
        source, framework=framework, registry=registry, show_progress=False, **load_options
    )
    assert [n.op_type for n in again.graph] == [n.op_type for n in model.graph], (
        "loading twice gave different graphs"
    )
    return model
