"""The files the documentation's examples use, made in seconds without a framework.

Every page of ``docs/`` (and the README) is run by ``tests/test_docs.py`` in a folder holding:

* ``model.onnx``: a CNN for scikit-learn's digits (``x[N, 1, 8, 8] -> Conv 16 -> Relu -> Conv 32 ->
  Relu -> MaxPool -> Flatten -> Gemm -> logits[N, 10]``). The convolutions are fixed random
  features and the classifier is fitted by ridge regression, so it builds in about a second
  with numpy and ONNX Runtime alone (about 95 % test accuracy);
* ``calib.npz`` (256 training images), ``train.npz`` (training images and ``labels``),
  ``test.npz`` (held-out images and ``labels``) and ``data.npz`` (64 test images): the
  ``.npz`` convention, one array per model input plus optional ``labels``.

The demo (``modelpress demo``) writes files of the same shape: its model is trained with torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FILES = ("model.onnx", "calib.npz", "train.npz", "test.npz", "data.npz")


def _digits() -> dict[str, np.ndarray]:
    from modelpress.app.demo import digits_arrays

    return digits_arrays("nchw")


def _graph(inits: dict[str, np.ndarray], *, head: bool) -> onnx.ModelProto:
    nodes = [
        helper.make_node(
            "Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node(
            "Conv", ["r1", "conv2.weight", "conv2.bias"], ["c2"], name="conv2", pads=[1, 1, 1, 1]
        ),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node(
            "MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]
        ),
        helper.make_node("Flatten", ["p"], ["features"], name="flatten"),
    ]
    output = "features"
    if head:
        nodes.append(
            helper.make_node(
                "Gemm", ["features", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1
            )
        )
        output = "logits"
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(
        nodes,
        "digits_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, 8, 8])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", 10 if head else 512])],
        [numpy_helper.from_array(v, k) for k, v in inits.items() if k in used],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="modelpress-docs"
    )
    model.ir_version = 8
    return model


def digits_cnn(data: dict[str, np.ndarray]) -> onnx.ModelProto:
    """The docs' digits CNN: random convolutions, a ridge-regression classifier."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    inits = {
        "conv1.weight": (rng.standard_normal((16, 1, 3, 3)) / 3).astype(np.float32),
        "conv1.bias": np.zeros(16, np.float32),
        "conv2.weight": (rng.standard_normal((32, 16, 3, 3)) / 12).astype(np.float32),
        "conv2.bias": np.zeros(32, np.float32),
    }
    session = ort.InferenceSession(
        _graph(inits, head=False).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feats = session.run(None, {"x": data["x_train"]})[0].astype(np.float64)
    targets = np.eye(10)[data["y_train"]] * 2 - 1
    ones = np.ones((len(feats), 1))
    a = np.hstack([feats, ones])
    w = np.linalg.solve(a.T @ a + 1.0 * np.eye(a.shape[1]), a.T @ targets)
    inits["fc.weight"] = w[:-1].T.astype(np.float32).copy()
    inits["fc.bias"] = w[-1].astype(np.float32)
    return _graph(inits, head=True)


def make_docs_files(folder: Path) -> dict[str, float]:
    """Write the files the docs' examples use into ``folder``; returns the model's test accuracy."""
    import onnxruntime as ort

    data = _digits()
    model = digits_cnn(data)
    onnx.save(model, folder / "model.onnx")
    np.savez(folder / "calib.npz", x=data["x_train"][:256])
    np.savez(folder / "train.npz", x=data["x_train"], labels=data["y_train"])
    np.savez(folder / "test.npz", x=data["x_test"], labels=data["y_test"])
    np.savez(folder / "data.npz", x=data["x_test"][:64])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    accuracy = float(
        np.mean(session.run(None, {"x": data["x_test"]})[0].argmax(1) == data["y_test"])
    )
    return {"accuracy": accuracy}


# NOTE: the first stage changes nothing on purpose: its NO GAIN flag shows how report.html colours a flag
REPORT_RECIPE = {
    "passes": [
        {
            "kind": "prune",
            "method": "magnitude",
            "name": "magnitude 0% (a no-op)",
            "options": {"sparsity": 0.0},
        },
        {
            "kind": "prune",
            "method": "channel",
            "name": "prune (channels 25%)",
            "options": {"ratio": 0.25},
        },
        {
            "kind": "quantize",
            "method": "int8-static",
            "name": "quantize (int8 static)",
            "options": {"calibrator": "percentile"},
        },
    ],
    "data": {"calibration": "calib.npz", "train": "train.npz", "eval": "test.npz"},
    "evaluate": {"metric": "accuracy", "batch_size": 64, "threads": 1, "repeats": 5},
}


def compressed_report(folder: Path) -> Path:
    """A real ``report.html``: the docs' digits CNN compressed by :data:`REPORT_RECIPE` in ``folder``
    (made with :func:`make_docs_files` when missing). Returns the report's path. Seconds, no framework."""
    import json

    import modelpress

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model.onnx").exists():
        make_docs_files(folder)
    recipe = folder / "report-recipe.json"
    recipe.write_text(json.dumps(REPORT_RECIPE, indent=1), encoding="utf-8")
    modelpress.compress(
        folder / "model.onnx",
        recipe,
        output=folder / "small.onnx",
        show_progress=False,
        allow_no_gain=True,
    )
    return folder / "report.html"


if __name__ == "__main__":  # python tests/docs_files.py FOLDER: the files, to try the docs by hand
    import sys

    out = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    out.mkdir(parents=True, exist_ok=True)
    print(make_docs_files(out))
