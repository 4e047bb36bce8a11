import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.testing import tiny_cnn, tiny_mlp


def _custom_op_model() -> modelpress.Model:
    """Valid ONNX (the checker accepts custom domains) that ONNX Runtime cannot run."""
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="frob")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    proto.ir_version = 8
    return modelpress.load(proto)


def test_export_writes_loads_and_reports_figures(tmp_path, digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    result = modelpress.export(model, tmp_path / "out.onnx", sample={"x": digits["x_test"][:64]})
    assert result.path.exists() and result.size_bytes == result.path.stat().st_size
    v = result.verification
    assert (
        v.samples == 64
        and v.max_abs_diff == 0.0
        and v.cosine == pytest.approx(1.0)
        and v.top1_agreement == 1.0
    )
    assert not list(tmp_path.glob(".*tmp*")), "temporary folder left behind"
    onnx.checker.check_model(str(result.path), full_check=True)


def test_export_compares_against_the_reference(tmp_path):
    model = tiny_mlp()
    changed = model.clone()
    changed.replace_initializer(
        "fc2.bias", changed.initializer("fc2.bias").const_value.numpy() + 0.5
    )
    result = modelpress.export(changed, tmp_path / "c.onnx")
    assert result.verification.max_abs_diff == pytest.approx(0.5, abs=1e-5)
    with pytest.raises(modelpress.VerificationError, match=r"max \|diff\|.*nothing was written"):
        modelpress.export(changed, tmp_path / "strict.onnx", atol=1e-3)
    assert not (tmp_path / "strict.onnx").exists()


def test_ort_cannot_load_leaves_nothing(tmp_path):
    model = _custom_op_model()
    with pytest.raises(
        modelpress.ExportError, match=r"ONNX Runtime cannot load.*Frobnicate.*nothing was written"
    ):
        modelpress.export(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_an_existing_file(tmp_path):
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"previous content")
    with pytest.raises(modelpress.ExportError):
        modelpress.export(_custom_op_model(), target)
    assert target.read_bytes() == b"previous content"


def test_export_with_external_data(tmp_path):
    model = tiny_cnn(channels=16)
    result = modelpress.export(model, tmp_path / "ext.onnx", external_data=True)
    assert result.external_data == tmp_path / "ext.onnx.data"
    assert result.external_data.stat().st_size > 0
    again = modelpress.load(tmp_path / "ext.onnx")
    np.testing.assert_array_equal(
        again.initializer("conv2.weight").const_value.numpy(),
        model.initializer("conv2.weight").const_value.numpy(),
    )
    assert result.verification.max_abs_diff == 0.0


def test_export_into_missing_folder_or_onto_a_folder(tmp_path):
    with pytest.raises(modelpress.ExportError, match="does not exist"):
        modelpress.export(tiny_mlp(), tmp_path / "no" / "such" / "m.onnx")
    with pytest.raises(modelpress.ExportError, match="is a folder"):
        modelpress.export(tiny_mlp(), tmp_path)


def test_sample_data_is_validated(tmp_path):
    with pytest.raises(modelpress.DataError, match=r"input 'x' has size 5 on axis 1"):
        modelpress.export(
            tiny_mlp(), tmp_path / "m.onnx", sample={"x": np.zeros((2, 5), np.float32)}
        )
    with pytest.raises(modelpress.DataError, match="NaN"):
        modelpress.export(
            tiny_mlp(), tmp_path / "m.onnx", sample={"x": np.full((2, 8), np.nan, np.float32)}
        )
    assert not (tmp_path / "m.onnx").exists()
