"""The ONNX import check's ORT sessions: one per model however many random inputs it tries, never
two alive at once, none left alive after the load (counts of sessions built, not timings)."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.runtime import session as session_module
from modelpress.runtime.session import make_session, run


class _Counting:
    """Wraps ``onnxruntime.InferenceSession`` (real sessions): how many were built, how many live."""

    def __init__(self) -> None:
        self.built = 0
        self.alive = 0
        self.most_alive = 0
        counter = self

        class Session(ort.InferenceSession):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                counter.built += 1
                counter.alive += 1
                counter.most_alive = max(counter.most_alive, counter.alive)

            def __del__(self):
                counter.alive -= 1

        self.session = Session


@pytest.fixture
def counting(monkeypatch):
    counter = _Counting()
    monkeypatch.setattr(session_module.ort, "InferenceSession", counter.session)
    return counter


def _padded(path, pad: int) -> None:
    """y = reflect-pad(x) * c, with c in a Constant node (normalize lifts it, so the check runs);
    x is float[n, 8], padded on its batch axis: reflection needs n > ``pad``, which random inputs of
    batch 2, 64 and 256 do not all give."""
    c = numpy_helper.from_array(np.full((1, 1), 0.5, np.float32), "c")
    pads = numpy_helper.from_array(np.array([pad, 0, pad, 0], np.int64), "pads")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], value=c),
            helper.make_node("Pad", ["x", "pads"], ["p"], mode="reflect"),
            helper.make_node("Mul", ["p", "c"], ["y"]),
        ],
        "padded",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", 8])],
        [pads],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_an_original_that_refuses_every_random_input_gets_one_session(tmp_path, counting):
    """Three input sizes tried (2, 64, 256 all too short for a 300-wide reflection): the original's
    session is built once and run three times; the normalised model's is never built."""
    _padded(tmp_path / "pad.onnx", pad=300)
    model = modelpress.load(tmp_path / "pad.onnx", show_progress=False)
    check = model.provenance.extra["normalize"]["check"]
    assert check.startswith("not run: ONNX Runtime cannot run the original"), check
    assert "Pad" in check
    assert counting.built == 1  # NOTE: nothing to fold here: every session is the check's
    assert counting.alive == 0


def test_an_original_that_runs_on_a_later_input_keeps_its_session(tmp_path, counting):
    """Inputs of 2 fail a 100-wide reflection, 64 still fails, 256 runs: one session of the original
    for all three, then one of the normalised model, never both alive, none left after the load."""
    _padded(tmp_path / "pad.onnx", pad=100)
    model = modelpress.load(tmp_path / "pad.onnx", show_progress=False)
    check = model.provenance.extra["normalize"]["check"]
    assert check["equal"] is True
    assert counting.built == 2
    assert counting.most_alive == 1
    assert counting.alive == 0


def test_given_samples_build_one_session_per_model(tmp_path, counting):
    _padded(tmp_path / "pad.onnx", pad=3)
    sample = {"x": np.random.default_rng(0).normal(size=(16, 8)).astype(np.float32)}
    model = modelpress.load(tmp_path / "pad.onnx", sample=sample, show_progress=False)
    assert model.provenance.extra["normalize"]["check"]["equal"] is True
    assert counting.built == 2
    assert counting.alive == 0


def test_a_proto_with_no_large_main_graph_weight_runs_as_serialised(tmp_path):
    """Weights in Constant nodes (nothing to hand over by reference): the proto's session gives
    the outputs of a session of its file, and the proto is left as it was."""
    _padded(tmp_path / "pad.onnx", pad=3)
    proto = onnx.load(tmp_path / "pad.onnx")
    before = proto.SerializeToString()
    feeds = {"x": np.arange(64, dtype=np.float32).reshape(8, 8)}
    from_proto = run(make_session(proto, prepack=False, spin=False), feeds)
    from_file = run(make_session(str(tmp_path / "pad.onnx")), feeds)
    assert proto.SerializeToString() == before
    np.testing.assert_array_equal(from_proto[0], from_file[0])


def test_a_session_without_constant_folding_gives_the_same_outputs(tmp_path):
    """fold=False (the import check's sessions, the reference of export's verification): ORT's constant folding is
    off, its Constant node runs at each run instead, to the same outputs."""
    _padded(tmp_path / "pad.onnx", pad=3)
    proto = onnx.load(tmp_path / "pad.onnx")
    feeds = {"x": np.arange(64, dtype=np.float32).reshape(8, 8)}
    folding = make_session(proto.SerializeToString())
    not_folding = make_session(proto.SerializeToString(), fold=False)
    key = "optimization.disable_specified_optimizers"
    assert not_folding.get_session_options().get_session_config_entry(key) == "ConstantFolding"
    np.testing.assert_array_equal(run(not_folding, feeds)[0], run(folding, feeds)[0])
