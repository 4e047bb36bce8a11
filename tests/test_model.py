import numpy as np
import onnx
import onnx_ir as ir

import modelpress
from modelpress.runtime.session import make_session, run
from modelpress.testing import assert_valid, tiny_cnn, tiny_mlp


def test_load_gives_signature_with_symbolic_batch(digits_mlp_path):
    model = modelpress.load(digits_mlp_path)
    sig = model.signature
    assert sig.input_names == ["x"] and sig.output_names == ["logits"]
    assert sig.inputs[0].shape == ("batch", 64)
    assert sig.inputs[0].dtype == np.float32
    assert model.provenance.source_framework == "onnx"
    assert model.opset == 17


def test_trained_model_accuracy_through_ort(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    (logits,) = run(make_session(model), {"x": digits["x_test"]})
    assert np.mean(logits.argmax(1) == digits["y_test"]) > 0.93


def test_weighted_layers_know_their_axes():
    cnn = tiny_cnn(channels=4)
    layers = {layer.name: layer for layer in cnn.weighted_layers()}
    assert set(layers) == {"conv1", "conv2", "fc"}
    assert layers["conv2"].weight_array().shape[layers["conv2"].out_axis] == 8
    assert layers["fc"].out_axis == 0  # Gemm transB=1: [out, in]
    assert layers["conv1"].bias is not None and layers["conv1"].bias_array().shape == (4,)


def test_weighted_layers_non_transposed_gemm(digits_mlp_path):
    layers = modelpress.load(digits_mlp_path).weighted_layers()
    assert [layer.op_type for layer in layers] == ["Gemm", "Gemm"]
    first = layers[0]
    assert first.weight_array().shape == (64, 64) and first.out_axis == 1 and first.in_axis == 0


def test_clone_shares_weights_and_isolates_structure():
    model = tiny_mlp()
    clone = model.clone()
    assert (
        clone.initializer("fc1.weight").const_value is model.initializer("fc1.weight").const_value
    )
    clone.replace_initializer("fc1.weight", np.zeros((16, 8), np.float32))
    assert np.any(model.initializer("fc1.weight").const_value.numpy() != 0)
    assert clone.reference is model


def test_replace_initializer_changes_outputs():
    model = tiny_mlp()
    x = {"x": np.ones((2, 8), np.float32)}
    old_bias = model.initializer("fc2.bias").const_value.numpy().copy()
    before = run(make_session(model), x)[0]
    model.replace_initializer("fc2.bias", np.full(4, 5.0, np.float32))
    after = run(make_session(model), x)[0]
    np.testing.assert_allclose(
        after - before, np.broadcast_to(5.0 - old_bias, after.shape), atol=1e-5
    )


def test_insert_after_rewires_consumers_and_graph_outputs():
    model = tiny_mlp()
    x = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    expected = run(make_session(model), x)[0]
    # Identity on an inner edge and on the graph output: numerics unchanged, names kept.
    h = next(n for n in model.nodes() if n.name == "relu1").outputs[0]
    model.insert_after(h, "Identity")
    model.insert_after(model.graph.outputs[0], "Neg")
    assert model.signature.output_names == ["logits"]
    got = assert_valid(model, sample=x)[0]
    np.testing.assert_allclose(got, -expected, rtol=1e-6)
    assert model.op_histogram()["Identity"] == 1


def test_insert_after_an_initializer_puts_node_first():
    model = tiny_mlp()
    weight = model.initializer("fc1.weight")
    model.replace_initializer("fc1.weight", weight.const_value.numpy().astype(np.float16))
    model.insert_after(weight, "Cast", attributes={"to": ir.DataType.FLOAT})
    assert next(iter(model.nodes())).op_type == "Cast"
    assert_valid(model)


def test_add_initializer_makes_unique_names():
    model = tiny_mlp()
    value = model.add_initializer("fc1.weight", np.ones(3, np.float32))
    assert value.name == "fc1.weight_1"
    assert model.initializer("fc1.weight_1").const_value.numpy().tolist() == [1, 1, 1]


def test_counts_and_histogram(digits_mlp_path):
    model = modelpress.load(digits_mlp_path)
    assert model.parameter_count() == 64 * 64 + 64 + 64 * 10 + 10
    assert model.weight_bytes() == 4 * model.parameter_count()
    assert model.op_histogram() == {"Gemm": 2, "Relu": 1}
    info = modelpress.describe(model)
    assert info["size_on_disk"] == digits_mlp_path.stat().st_size
    assert info["weighted_layers"] == 2


def test_provenance_survives_export_and_reload(tmp_path):
    model = tiny_mlp()
    record = modelpress.PassRecord(
        kind="prune", method="m", options={"a": 1}, plugin="p", plugin_version="9"
    )
    model.provenance = model.provenance.with_pass(record)
    modelpress.export(model, tmp_path / "m.onnx")
    props = {p.key: p.value for p in onnx.load(tmp_path / "m.onnx").metadata_props}
    assert (
        "modelpress.ir.provenance" in props
        and props["modelpress.version"] == modelpress.__version__
    )
    again = modelpress.load(tmp_path / "m.onnx")
    assert again.provenance.passes == (record,)
    assert again.provenance.source_framework == "onnx"


def test_replacing_a_weight_dtype_in_a_clone_leaves_the_original_typed():
    model = tiny_mlp()
    clone = model.clone()
    clone.replace_initializer(
        "fc1.weight", clone.initializer("fc1.weight").const_value.numpy().astype(np.float16)
    )
    assert model.initializer("fc1.weight").dtype == ir.DataType.FLOAT
    assert clone.initializer("fc1.weight").dtype == ir.DataType.FLOAT16


def test_setting_dtype_on_a_clone_does_not_retype_the_original():
    model = tiny_mlp()
    clone = model.clone()
    next(iter(clone.nodes())).outputs[0].dtype = ir.DataType.FLOAT16
    clone.graph.inputs[0].shape = None
    assert next(iter(model.nodes())).outputs[0].dtype == ir.DataType.FLOAT
    assert model.signature.inputs[0].shape == ("batch", 8)


def test_replace_node_rewires_outputs_and_drops_unused_weights():
    model = tiny_mlp()
    x = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    expected = run(make_session(model), x)[0]
    fc2 = model.node("fc2")
    weight = model.add_initializer(
        "w_copy", model.initializer("fc2.weight").const_value.numpy().T.copy()
    )
    bias = model.add_initializer("b_copy", model.initializer("fc2.bias").const_value.numpy())
    matmul = ir.node("MatMul", [fc2.inputs[0], weight], name="mm")
    add = ir.node("Add", [matmul.outputs[0], bias], name="add")
    model.replace_node(fc2, [matmul, add], add.outputs[0])
    assert model.signature.output_names == ["logits"]
    assert (
        "fc2.weight" not in model.graph.initializers and "fc2.bias" not in model.graph.initializers
    )
    np.testing.assert_allclose(assert_valid(model, sample=x)[0], expected, rtol=1e-5, atol=1e-6)


def test_unique_names_stay_unique_across_many_edits():
    model = tiny_mlp()
    names = [model.add_initializer("w", np.zeros(1, np.float32)).name for _ in range(50)]
    assert len(set(names)) == 50 and names[0] == "w" and names[1] == "w_1"
    # a name created behind the model's back (graph edited directly) is still seen
    value = ir.Value(
        name="fresh",
        type=ir.TensorType(ir.DataType.FLOAT),
        shape=ir.Shape([1]),
        const_value=ir.tensor(np.zeros(1, np.float32), name="fresh"),
    )
    model.graph.register_initializer(value)
    assert model.add_initializer("fresh", np.ones(1, np.float32)).name == "fresh_1"
