"""Re-inferring shapes after a graph edit: the old full proto round trip vs ``Model.infer_shapes``.

    python benchmarks/shape_inference.py [--layers 8] [--width 4096]

Channel pruning used to re-validate its result by serialising the whole model (every weight read
into the proto, external data included) and loading it again; now it runs strict ONNX shape
inference in memory with the weights left out (``Model.infer_shapes``). Each variant runs in its
own subprocess on the same external-data MLP (memory-mapped weights), so peak RSS is comparable;
the table prints both side by side, measured in this run. The old path cannot run at all on a
model over 2 GB (protobuf's limit); the new one is also run on a 2.2 GB model to show it does.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write_model(folder: Path, layers: int, width: int) -> Path:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits.append(
            numpy_helper.from_array(rng.standard_normal((width, width), np.float32) * 0.01, f"w{i}")
        )
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"], name=f"mm{i}"))
        x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", width])],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save(
        proto,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="mlp.onnx.data",
    )
    return path


def _variant(which: str, path: str) -> dict[str, float]:
    import modelpress

    model = modelpress.load(path, normalize=False, show_progress=False)
    for node in model.graph:
        for out in node.outputs:
            if out not in model.graph.outputs:
                out.shape = None
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if (
        which == "old"
    ):  # NOTE: what prune's re-validation did before: the whole model through a proto
        with model.inlined():
            proto = model.to_proto()
        modelpress.load(proto, framework="onnx", normalize=False, show_progress=False)
    else:
        model.infer_shapes(reset=True)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "extra_rss_mb": (peak - base) / 1024}


def _huge() -> dict[str, float]:
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from modelpress.testing import make_model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])
    model = make_model(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
        [x],
        [y],
        {"w": np.zeros((2, 2), np.float32)},
        normalize=False,
    )
    big = np.broadcast_to(np.float32(0.5), (23_000, 24_000))  # 2.2 GB, no memory
    model.graph.initializers["w"].const_value = ir.Tensor(big, name="w")
    model.graph.initializers["w"].shape = ir.Shape(big.shape)
    model.graph.inputs[0].shape = ir.Shape(["N", 23_000])
    model.graph.outputs[0].shape = None
    start = time.perf_counter()
    model.infer_shapes(reset=True)
    return {"seconds": time.perf_counter() - start, "weight_gb": big.nbytes / 1e9}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--variant", choices=("old", "new", "huge"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(_huge() if args.variant == "huge" else _variant(args.variant, args.path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_model(Path(tmp), args.layers, args.width)
        size = sum(p.stat().st_size for p in Path(tmp).iterdir()) / 1e6
        rows = {}
        for which in ("old", "new", "huge"):
            out = subprocess.run(
                [sys.executable, __file__, "--variant", which, "--path", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            rows[which] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"model: {args.layers} MatMul layers of {args.width}x{args.width} float32, {size:.0f} MB (external data, memory-mapped)\n"
    )
    print(f"{'shape re-inference after an edit':<46} {'seconds':>9} {'extra peak RSS (MB)':>20}")
    print(
        f"{'before: full proto round trip + re-load':<46} {rows['old']['seconds']:>9.3f} {rows['old']['extra_rss_mb']:>20.0f}"
    )
    print(
        f"{'now: Model.infer_shapes (in memory)':<46} {rows['new']['seconds']:>9.3f} {rows['new']['extra_rss_mb']:>20.0f}"
    )
    print(
        f"{'ratio (before / now)':<46} {rows['old']['seconds'] / max(rows['new']['seconds'], 1e-9):>8.0f}x "
        f"{rows['old']['extra_rss_mb'] / max(rows['new']['extra_rss_mb'], 1):>19.0f}x"
    )
    print(
        f"\n{rows['huge']['weight_gb']:.1f} GB weight: infer_shapes {rows['huge']['seconds']:.3f} s "
        "(the proto round trip cannot hold a model over 2 GB)"
    )


if __name__ == "__main__":
    main()
