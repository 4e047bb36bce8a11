"""modelpress-sklearn: an adapter for scikit-learn's multi-layer perceptrons.

``modelpress.load(mlp)`` with a fitted ``MLPClassifier`` or ``MLPRegressor`` returns a
:class:`modelpress.Model`: ``x [N, features] -> probabilities [N, classes]`` (a classifier) or
``-> predictions [N, outputs]`` (a regressor). The conversion is checked against scikit-learn's
own ``predict_proba``/``predict`` on example inputs (``example_inputs=``, default random) with the
same import check the built-in adapters use, so a wrong conversion never reaches a user.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from modelpress.plugin_api import (
    Adapter,
    Model,
    Provenance,
    UnsupportedModelError,
    check_import,
    hookimpl,
)

__all__ = ["load_sklearn", "to_onnx"]

_ACTIVATIONS = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}


def _is_mlp(source: Any) -> bool:
    # NOTE: never import scikit-learn to answer: accepts() runs for every source modelpress loads
    return type(source).__name__ in ("MLPClassifier", "MLPRegressor") and type(
        source
    ).__module__.startswith("sklearn.")


def _layers(mlp: Any, nodes: list[Any], inits: list[Any]) -> str:
    """MatMul + Add (+ activation) per layer; returns the last value's name."""
    x = "x"
    last = len(mlp.coefs_) - 1
    for i, (w, b) in enumerate(zip(mlp.coefs_, mlp.intercepts_, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"layer{i}.weight"),
            numpy_helper.from_array(b.astype(np.float32), f"layer{i}.bias"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"layer{i}.weight"], [f"layer{i}.mm"], name=f"layer{i}"),
            helper.make_node(
                "Add", [f"layer{i}.mm", f"layer{i}.bias"], [f"layer{i}.out"], name=f"layer{i}.add"
            ),
        ]
        x = f"layer{i}.out"
        op = _ACTIVATIONS[mlp.activation] if i < last else None
        if op is not None:
            nodes.append(
                helper.make_node(op, [x], [f"layer{i}.act"], name=f"layer{i}.{mlp.activation}")
            )
            x = f"layer{i}.act"
    return x


def to_onnx(mlp: Any, opset: int = 17) -> Any:
    """The ONNX ``ModelProto`` of a fitted MLP (what the adapter hands to ``Model.from_onnx``)."""
    if not hasattr(mlp, "coefs_"):
        raise UnsupportedModelError(
            f"{type(mlp).__name__} is not fitted (call .fit first); there are no weights to import"
        )
    if mlp.activation not in _ACTIVATIONS:
        raise UnsupportedModelError(
            f"{type(mlp).__name__}: activation {mlp.activation!r} is not supported ({', '.join(_ACTIVATIONS)})"
        )
    nodes: list[Any] = []
    inits: list[Any] = []
    logits = _layers(mlp, nodes, inits)
    classifier = type(mlp).__name__ == "MLPClassifier"
    if classifier and mlp.out_activation_ == "softmax":
        nodes.append(
            helper.make_node("Softmax", [logits], ["probabilities"], name="softmax", axis=-1)
        )
    elif classifier:  # NOTE: binary: one logistic unit; predict_proba gives [1 - p, p]
        nodes += [
            helper.make_node("Sigmoid", [logits], ["p"], name="sigmoid"),
            helper.make_node("Sub", ["one", "p"], ["q"], name="complement"),
            helper.make_node("Concat", ["q", "p"], ["probabilities"], name="proba", axis=1),
        ]
        inits.append(numpy_helper.from_array(np.ones((1, 1), np.float32), "one"))
    else:
        nodes.append(helper.make_node("Identity", [logits], ["predictions"], name="predictions"))
    out_name = "probabilities" if classifier else "predictions"
    width = len(mlp.classes_) if classifier else mlp.n_outputs_
    graph = helper.make_graph(
        nodes,
        type(mlp).__name__,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", mlp.n_features_in_])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="modelpress-sklearn"
    )
    proto.ir_version = 8
    return proto


def load_sklearn(mlp: Any, *, example_inputs: Any = None, rtol: float = 1e-4, **_: Any) -> Model:
    """A fitted ``MLPClassifier``/``MLPRegressor`` as a :class:`modelpress.Model`, checked against
    scikit-learn's outputs on ``example_inputs`` (default: 16 random rows)."""
    import sklearn

    label = f"scikit-learn {type(mlp).__name__}"
    proto = to_onnx(mlp)
    model = Model.from_onnx(
        proto,
        provenance=Provenance(
            source_framework="sklearn",
            source_version=sklearn.__version__,
            source=label,
            importer="modelpress-sklearn",
        ),
    )
    x = np.asarray(
        example_inputs
        if example_inputs is not None
        else np.random.default_rng(0).standard_normal((16, mlp.n_features_in_)),
        np.float32,
    )
    reference = (
        mlp.predict_proba(x)
        if type(mlp).__name__ == "MLPClassifier"
        else mlp.predict(x).reshape(len(x), -1)
    )
    figures = check_import([np.asarray(reference, np.float32)], model, {"x": x}, rtol, label)
    model.provenance.extra["import_check"] = figures
    return model


@hookimpl
def modelpress_register_adapters(register):  # type: ignore[no-untyped-def]
    register(
        Adapter(
            name="sklearn",
            accepts=_is_mlp,
            load=load_sklearn,
            summary="scikit-learn MLPClassifier / MLPRegressor (fitted objects)",
        )
    )
