"""Opening a model with > 2 GB of external data must not read the weights."""

import subprocess
import sys

import numpy as np
import pytest
from onnx import TensorProto, helper

ROWS, COLS = 40_000, 16_000  # 640 M float32 = 2.56 GB


@pytest.fixture(scope="module")
def huge_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("huge")
    data = folder / "weights.bin"
    nbytes = ROWS * COLS * 4
    with open(data, "wb") as f:
        f.truncate(nbytes)  # sparse: takes no disk space and no time
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[ROWS, COLS])
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "weights.bin"), ("offset", "0"), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", ROWS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", COLS])],
        [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = folder / "huge.onnx"
    path.write_bytes(proto.SerializeToString())
    return path, nbytes


def test_open_inspect_and_clone_do_not_read_weights(huge_model):
    path, nbytes = huge_model
    code = f"""
import modelpress
model = modelpress.load({str(path)!r})
info = modelpress.describe(model)
assert info["parameters"] == {ROWS * COLS}, info["parameters"]
assert info["weight_bytes"] == {nbytes}
assert [layer.name for layer in model.weighted_layers()] == ["proj"]
clone = model.clone()
tensor = clone.initializer("w").const_value
assert tuple(tensor.shape) == ({ROWS}, {COLS})
row = tensor.numpy()[123]  # memory-mapped: touching one row reads one row
assert row.shape == ({COLS},) and not row.any()
# NOTE: VmHWM, not ru_maxrss: the latter keeps the forking parent's high-water mark across exec.
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(int(hwm.split()[1]) * 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    # The data is 2.56 GB; the process (Python + numpy + onnx + ORT) must stay far below it.
    print(f"peak RSS {peak / 1e6:.0f} MB")
    assert peak < 600_000_000, f"peak RSS {peak / 1e6:.0f} MB for {nbytes / 1e9:.2f} GB of weights"
    assert np.isfinite(peak)
