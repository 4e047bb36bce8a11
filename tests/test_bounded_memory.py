"""Bounded memory (modelpress.runtime.session.bound_malloc): decided once per process from the
first model's weight bytes (initializers and Constant tensors), on for small models only, and
forced either way by $MODELPRESS_MALLOC; the garbage collection before a session follows it."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from modelpress.runtime import session
from modelpress.testing import tiny_cnn, tiny_mlp


@pytest.fixture
def undecided(monkeypatch):
    """A process whose decision is not yet made (restored after the test)."""
    monkeypatch.setattr(session, "_BOUND", [])
    monkeypatch.setattr(session, "_COLLECTED_AT", [])
    monkeypatch.delenv(session.MALLOC_ENV, raising=False)
    return monkeypatch


def _nbytes(model) -> int:
    return sum(
        int(v.const_value.nbytes) for v in model.ir.graph.initializers.values() if v.const_value
    )


def test_weight_bytes_counts_initializers_and_constants_of_every_form(tmp_path):
    model = tiny_cnn(channels=4, in_channels=3)
    expected = _nbytes(model)
    assert session.weight_bytes(model) == session.weight_bytes(model.ir) == expected
    assert session.weight_bytes(model.to_proto()) == expected
    # NOTE: a Constant node's tensor counts as weights (PP-OCR's files hold theirs that way)
    value = onnx.numpy_helper.from_array(np.ones((16, 16), np.float32), "c")
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Constant", [], ["c"], value=value),
            onnx.helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [16, 16])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [16, 16])],
    )
    constant_model = onnx.helper.make_model(graph)
    assert session.weight_bytes(constant_model) == 16 * 16 * 4
    path = tmp_path / "m.onnx"
    onnx.save(constant_model, path)
    assert session.weight_bytes(path) == path.stat().st_size
    assert session.weight_bytes(b"1234") == 4
    assert session.weight_bytes(object()) is None


def test_a_small_model_bounds_memory_once_and_a_later_large_one_changes_nothing(undecided):
    assert session.bound_malloc(None) is False  # unknown size: not decided yet
    assert session._BOUND == []
    assert session.bound_malloc(session.SMALL_MODEL_BYTES) is True
    assert session.bound_malloc(10 * session.SMALL_MODEL_BYTES) is True  # decided once
    assert session.collect_garbage_if_grown() is False  # the first call takes the measure
    assert session._COLLECTED_AT


def test_a_large_model_leaves_malloc_and_garbage_collection_alone(undecided):
    assert session.bound_malloc(session.SMALL_MODEL_BYTES + 1) is False
    assert session.bound_malloc(1) is False
    assert session.collect_garbage_if_grown() is False
    assert session._COLLECTED_AT == []


@pytest.mark.parametrize(
    ("setting", "size", "bound"), [("default", 1, False), ("bounded", 1 << 40, True)]
)
def test_the_environment_forces_the_decision(undecided, setting, size, bound):
    undecided.setenv(session.MALLOC_ENV, setting)
    assert session.bound_malloc(size) is bound


def test_the_first_session_decides_from_its_model(undecided):
    model = tiny_mlp()
    session.make_session(model)
    assert session._BOUND == [_nbytes(model) <= session.SMALL_MODEL_BYTES] == [True]


_CHILD = """
import json, re
import numpy as np
import modelpress
from modelpress.testing import tiny_cnn, tiny_mlp
def status(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
rng = np.random.default_rng(0)
# NOTE: every library imported and initialised first, by a quantization of a tiny model
warm = {"x": rng.standard_normal((8, 8)).astype(np.float32)}
modelpress.quantize(tiny_mlp(), "int8-static", calibration=warm, show_progress=False, allow_no_gain=True)
model = tiny_cnn(channels=32, size=64, in_channels=3, classes=4)
x = rng.standard_normal((16, 3, 64, 64)).astype(np.float32)
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # NOTE: the kernel's high-water mark starts again from here (Linux >= 4.0)
except OSError:
    print(json.dumps(None))
    raise SystemExit
floor = status("VmRSS")
modelpress.quantize(model, "int8-static", calibration={"x": x}, show_progress=False)
print(json.dumps({"floor": floor, "peak": status("VmHWM")}))
"""


def test_int8_static_peak_on_a_small_cnn_stays_within_a_few_activations():
    """A small CNN (0.08 MB of weights: bounded memory, as PP-OCR cls; 16 calibration images whose first
    Conv outputs 8 MB): int8-static raises the process's high-water mark by under 3x that output
    (15 MB measured; 50 MB when a batch ran whole and its histogram binned whole tensors)."""
    out = subprocess.run([sys.executable, "-c", _CHILD], check=True, capture_output=True, text=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    if figures is None:
        pytest.skip("the kernel's high-water mark cannot be reset here (/proc/self/clear_refs)")
    activation = 16 * 32 * 64 * 64 * 4
    assert figures["peak"] - figures["floor"] < 3 * activation, figures
