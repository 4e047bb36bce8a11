"""Bounded memory (modelpress.runtime.session.bound_malloc): decided once per process from the
first model's weight bytes (initializers and Constant tensors), on for small models only, and
forced either way by $MODELPRESS_MALLOC; the garbage collection before a session follows it."""

from __future__ import annotations

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
