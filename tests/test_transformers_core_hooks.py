"""The core hooks the Transformers adapter uses, tested without transformers: ``modelpress_load_data``
(a data file only a plugin reads) and the sizes a model declares for named axes of generated samples."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.data.samples import declared_axis_sizes, sample_inputs
from modelpress.ir.provenance import Provenance
from modelpress.ir.signature import Signature, TensorSpec
from modelpress.testing import tiny_mlp
from tests.test_plugins import ScalePlugin


class CsvReader:
    """Reads a ``.csv`` file of numbers as the inputs of a model with one input ``x``."""

    def __init__(self):
        self.calls = []

    @modelpress.hookimpl
    def modelpress_load_data(self, path, model, what):
        self.calls.append((path.name, what))
        if path.suffix != ".csv":
            return None
        rows = np.loadtxt(path, delimiter=",", dtype=np.float32, ndmin=2)
        if rows.shape[1] != 8:
            raise modelpress.DataError(f"{path.name}: {rows.shape[1]} columns; the model takes 8")
        return {model.signature.input_names[0]: rows}


class Crashing:
    @modelpress.hookimpl
    def modelpress_load_data(self, path):
        raise KeyError("broken")


def _csv(tmp_path, columns=8):
    path = tmp_path / "data.csv"
    np.savetxt(path, np.random.default_rng(0).standard_normal((16, columns)), delimiter=",")
    return path


def test_a_plugin_reads_a_data_file_type_the_core_does_not(tmp_path):
    reader = CsvReader()
    registry = modelpress.create_registry(plugins=[reader, ScalePlugin()])
    model = tiny_mlp()
    path = _csv(tmp_path)
    data = registry.load_data(str(path), model, "calibration")
    np.testing.assert_allclose(data["x"], np.loadtxt(path, delimiter=",", dtype=np.float32))
    assert (
        registry.load_data(data, model, "calibration") is data
    )  # NOTE: data that is no path is left as it is
    npz = tmp_path / "data.npz"
    np.savez(npz, x=data["x"])
    assert registry.load_data(str(npz), model, "calibration") == str(npz) and reader.calls == [
        ("data.csv", "calibration")
    ]
    # NOTE: through apply, the method gets the arrays (int8-static calibrates on them)
    quantized = modelpress.apply(
        model,
        "int8-static",
        calibration=str(path),
        registry=modelpress.create_registry(plugins=[CsvReader()]),
        show_progress=False,
        allow_no_gain=True,
    )
    assert quantized.provenance.passes[-1].method == "int8-static"


def test_a_refusal_reaches_the_caller_and_a_crash_names_the_plugin(tmp_path):
    registry = modelpress.create_registry(plugins=[CsvReader()])
    with pytest.raises(modelpress.DataError, match=r"data\.csv: 3 columns; the model takes 8"):
        registry.load_data(str(_csv(tmp_path, columns=3)), tiny_mlp(), "calibration")
    crashing = modelpress.create_registry(plugins=[Crashing()])
    with pytest.raises(
        modelpress.PluginError,
        match=r"plugin 'Crashing' failed in modelpress_load_data: KeyError: 'broken'",
    ):
        crashing.load_data(str(_csv(tmp_path)), tiny_mlp(), "training")


def test_a_file_no_plugin_reads_keeps_the_loaders_message(tmp_path):
    (tmp_path / "corpus.txt").write_text("some text")
    with pytest.raises(
        modelpress.DataError, match=r"corpus\.txt'?: expected a \.npz or \.npy file"
    ):
        modelpress.quantize(tiny_mlp(), "int8-static", calibration=str(tmp_path / "corpus.txt"))


def test_declared_axis_sizes_shape_generated_samples():
    """Axes of one name take one declared size in every input (a mask over past + new tokens)."""
    i64, f32 = np.dtype("int64"), np.dtype("float32")
    signature = Signature(
        inputs=(
            TensorSpec("ids", i64, ("batch", "new")),
            TensorSpec("mask", i64, ("batch", "total")),
            TensorSpec("past", f32, ("batch", 2, "old", 4)),
        ),
        outputs=(),
    )
    plain = sample_inputs(signature)
    assert (plain["ids"].shape, plain["mask"].shape, plain["past"].shape) == (
        (2, 16),
        (2, 16),
        (2, 2, 2, 4),
    )
    sizes = declared_axis_sizes(
        Provenance(extra={"sample_axis_sizes": {"new": 5, "old": 3, "total": 8}}).extra
    )
    declared = sample_inputs(signature, axis_sizes=sizes)
    assert (declared["ids"].shape, declared["mask"].shape, declared["past"].shape) == (
        (2, 5),
        (2, 8),
        (2, 2, 3, 4),
    )
    assert declared_axis_sizes({}) == {}
    with pytest.raises(
        modelpress.DataError,
        match=r"sample_axis_sizes=\{'new': 0\}; it must map axis names to positive ints",
    ):
        declared_axis_sizes({"sample_axis_sizes": {"new": 0}})
