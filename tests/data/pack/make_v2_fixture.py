"""Writes ``v2-bytegroup.onnx`` and ``v2-bytegroup.mpk``: a pack made by the format-2 encoder of
commit b1029b6 (bytegroup planes coded by zstd -19 / LZMA, codebook, sparse, solid streams).
``tests/test_pack_compat.py`` checks that every later modelpress unpacks it bit-exactly; do not
regenerate it with a newer encoder (that would test nothing)."""

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import modelpress

HERE = Path(__file__).parent


def model() -> bytes:
    rng = np.random.default_rng(7)
    w32 = (rng.standard_normal((48, 40)) * 0.05).astype(np.float32)
    w32[0, :4] = [np.nan, np.inf, -np.inf, 1e-42]  # NaN, infinities, a denormal
    w16 = (rng.standard_normal((40, 32)) * 0.05).astype(np.float16)
    bf16 = (rng.standard_normal((32, 24)) * 0.05).astype(np.float32).view(np.uint32) >> 16
    sparse = rng.standard_normal((24, 16)).astype(np.float32) * (rng.random((24, 16)) > 0.9)
    book = rng.integers(-3, 4, (16, 16)).astype(np.int8)
    inits = [
        numpy_helper.from_array(w32, "w32"),
        numpy_helper.from_array(w16, "w16"),
        helper.make_tensor(
            "bf16", TensorProto.BFLOAT16, bf16.shape, bf16.astype(np.uint16).tobytes(), raw=True
        ),
        numpy_helper.from_array(sparse, "sparse"),
        numpy_helper.from_array(book, "book"),
    ]
    skewed = rng.standard_normal(2048).astype(np.float32)
    skewed[rng.random(2048) < 0.97] = (
        1.5  # exponents nearly constant: LZMA beats zstd on that plane
    )
    inits.append(numpy_helper.from_array(skewed + rng.integers(0, 2, 2048) * 1e-7, "skewed"))
    bias = (rng.standard_normal(64) * 0.01).astype(np.float32)
    inits += [
        numpy_helper.from_array(bias, f"b{i}") for i in range(4)
    ]  # equal biases: a solid stream
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "fixture",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


if __name__ == "__main__":
    onnx_path = HERE / "v2-bytegroup.onnx"
    onnx_path.write_bytes(model())
    result = modelpress.pack(onnx_path, HERE / "v2-bytegroup.mpk", prefer="size")
    print(
        result.codec_counts(),
        [(s["codec"], s["tensors"]) for s in result.solids],
        result.size_bytes,
    )
