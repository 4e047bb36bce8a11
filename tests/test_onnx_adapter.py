"""Bad inputs to the ONNX adapter: each a clear InvalidModelError naming the file."""

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.testing import tiny_mlp


def _external_model(tmp_path, location: str, *, write_data: bool = True, length: int | None = None):
    tensor = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    if length is not None:
        entry = tensor.external_data.add()
        entry.key, entry.value = "length", str(length)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [tensor],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "model.onnx"
    path.write_bytes(proto.SerializeToString())
    if write_data:
        (tmp_path / "w.bin").write_bytes(np.ones((4, 4), np.float32).tobytes())
    return path


def test_empty_file(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(modelpress.InvalidModelError, match=r"empty.onnx.*empty"):
        modelpress.load(path)


def test_truncated_file(tmp_path, digits_mlp_path):
    data = digits_mlp_path.read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        modelpress.InvalidModelError, match=r"truncated.onnx.*(truncated|not an ONNX)"
    ):
        modelpress.load(path)


def test_text_file_renamed_onnx(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("These are my notes, not a model.\nSecond line.\n")
    with pytest.raises(
        modelpress.InvalidModelError, match=r"notes.onnx.*not (a valid )?(an )?ONNX"
    ):
        modelpress.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(modelpress.InvalidModelError, match="no such file"):
        modelpress.load(tmp_path / "nope.onnx")


@pytest.mark.parametrize("location", ["../../etc/passwd", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 64)
    path = _external_model(inner, location, write_data=False)
    with pytest.raises(modelpress.UnsafeExternalDataError, match=r"model.onnx.*'w'"):
        modelpress.load(path)


def test_external_data_symlink_out_is_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones((4, 4), np.float32).tobytes())
    os.symlink(secret, inner / "w.bin")
    path = _external_model(inner, "w.bin", write_data=False)
    with pytest.raises(modelpress.UnsafeExternalDataError, match="outside the model's folder"):
        modelpress.load(path)


def test_external_data_missing_or_short(tmp_path):
    path = _external_model(tmp_path, "w.bin", write_data=False)
    with pytest.raises(modelpress.InvalidModelError, match="does not exist"):
        modelpress.load(path)
    (tmp_path / "w.bin").write_bytes(b"\0" * 10)
    with pytest.raises(modelpress.InvalidModelError, match="truncated"):
        modelpress.load(path)


def test_external_data_inside_folder_loads_lazily(tmp_path):
    path = _external_model(tmp_path, "w.bin")
    model = modelpress.load(path)
    tensor = model.initializer("w").const_value
    assert tensor.__class__.__name__ == "ExternalTensor"
    np.testing.assert_array_equal(tensor.numpy(), np.ones((4, 4), np.float32))


def test_unknown_op_fails_the_checker(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("FrobnicateTensor", ["x"], ["y"], name="frob")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "frob.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(modelpress.InvalidModelError, match=r"frob.onnx.*FrobnicateTensor"):
        modelpress.load(path)


def test_modelproto_and_bytes_inputs_are_not_modified(digits_mlp_path):
    proto = onnx.load(digits_mlp_path)
    before = proto.SerializeToString()
    model = modelpress.load(proto)
    model.replace_initializer("fc0.bias", np.zeros(64, np.float32))
    assert proto.SerializeToString() == before
    again = modelpress.load(before)
    assert again.signature.input_names == ["x"]


def test_onnx_ir_model_input():
    ir_model = tiny_mlp().ir
    model = modelpress.load(ir_model)
    assert model.ir is not ir_model
    assert model.parameter_count() == tiny_mlp().parameter_count()


def test_unsupported_object():
    with pytest.raises(
        modelpress.UnsupportedModelError,
        match=r"no installed adapter can load an object of type builtins\.dict",
    ):
        modelpress.load({"not": "a model"})


def test_initializers_keep_their_type_when_a_value_info_without_one_names_them(tmp_path):
    # NOTE: the torch exporter writes value_info entries for weights that hold only metadata; the IR
    # read them as untyped and fp16 silently skipped those weights (the file did not shrink)
    proto = modelpress.testing.tiny_mlp().to_proto()
    for init in proto.graph.initializer:
        entry = onnx.ValueInfoProto(name=init.name)
        entry.metadata_props.add(key="pkg.torch.onnx.original_node_name", value=f"p_{init.name}")
        proto.graph.value_info.append(entry)
    onnx.save(proto, tmp_path / "m.onnx")
    model = modelpress.load(tmp_path / "m.onnx")
    assert all(
        v.dtype is not None and v.shape is not None for v in model.ir.graph.initializers.values()
    )
    adapted = modelpress.Model.from_onnx(proto)  # NOTE: the adapter toolkit's path does the same
    assert all(
        v.dtype is not None and v.shape is not None for v in adapted.ir.graph.initializers.values()
    )
    half = modelpress.quantize(model, "fp16", show_progress=False)
    assert all(
        v.dtype == onnx.TensorProto.FLOAT16
        for v in half.ir.graph.initializers.values()
        if "weight" in (v.name or "")
    )
    modelpress.export(half, tmp_path / "half.onnx")  # loads and runs in ORT, outputs checked
