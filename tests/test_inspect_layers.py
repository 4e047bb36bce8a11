"""What `inspect` counts as a weighted layer and how it names layers in ONNX files (issue #25):
LSTM/GRU weights and embedding tables are listed with their parameters (an LSTM model showed
"weighted layers 0"), and a file the torch exporter wrote speaks module paths, not ``node_Conv_N``."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.app.describe import layer_rows
from tests.conftest import run_cli_here


def _lstm_file(path) -> None:
    """x[N, T] int64 -> Gather(table 50x6) -> LSTM(hidden 5) -> Y_h -> Gemm -> [N, 3] (W, R, B constants)."""
    rng = np.random.default_rng(0)
    inits = {
        "table": rng.standard_normal((50, 6)).astype(np.float32),
        "W": rng.standard_normal((1, 20, 6)).astype(np.float32),
        "R": rng.standard_normal((1, 20, 5)).astype(np.float32),
        "B": np.zeros((1, 40), np.float32),
        "fc.weight": rng.standard_normal((3, 5)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Gather", ["table", "x"], ["e"], name="embed"),
        helper.make_node("Transpose", ["e"], ["t"], perm=[1, 0, 2], name="to_time_major"),
        helper.make_node("LSTM", ["t", "W", "R", "B"], ["", "h"], hidden_size=5, name="rnn"),
        helper.make_node("Flatten", ["h"], ["s"], axis=2, name="flatten"),
        helper.make_node("Gemm", ["s", "fc.weight"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.INT64, ["N", 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_inspect_lists_recurrent_layers_and_embedding_tables(tmp_path):
    path = tmp_path / "lstm.onnx"
    _lstm_file(path)
    rows = {r["name"]: r for r in layer_rows(modelpress.load(path, show_progress=False))}
    assert (
        rows["rnn"]["op"] == "LSTM"
        and rows["rnn"]["parameters"] == 20 * 6 + 20 * 5 + 40
        and rows["rnn"]["weight_shape"] == [1, 20, 6]
    )
    assert (
        rows["embed"]["op"] == "Gather"
        and rows["embed"]["parameters"] == 300
        and rows["embed"]["weight_shape"] == [50, 6]
    )
    assert rows["fc"]["parameters"] == 15
    info = json.loads(run_cli_here("inspect", str(path), "--json").stdout)
    assert info["weighted_layers"] == 3 and info["parameters"] == 300 + 260 + 15
    shown = run_cli_here("inspect", str(path), "--layers").stdout
    assert "weighted layers 3" in shown and "LSTM" in shown and "1x20x6" in shown


@pytest.mark.torch
def test_an_onnx_file_from_the_torch_exporter_speaks_module_paths(tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.encoder = nn.LSTM(16, 24, batch_first=True)
            self.head = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 5))

        def forward(self, x):
            h, _ = self.encoder(self.emb(x))
            return self.head(h[:, -1])

    torch.manual_seed(0)
    path = tmp_path / "tagger.onnx"
    torch.onnx.export(Tagger().eval(), (torch.randint(0, 100, (2, 9)),), str(path), dynamo=True)
    model = modelpress.load(path, show_progress=False)
    rows = {r["name"]: r["op"] for r in layer_rows(model)}
    assert rows == {"head.0": "Gemm", "head.2": "Gemm", "emb": "Gather", "encoder": "LSTM"}, rows
    assert not [n.name for n in model.nodes() if n.name.startswith("node_Gemm")]
    # the names are what options take
    pruned = modelpress.prune(model, "magnitude", sparsity=0.5, exclude=["head.2"], min_elements=1)
    assert pruned.provenance.passes[-1].figures["skipped"]["head.2"] == "excluded by option"


def test_a_quantized_model_keeps_its_weighted_layers():
    from modelpress.testing import tiny_mlp
    from tests.models import tiny_cnn_int8

    def table(model):
        return sorted((r["name"], r["weight_shape"], r["parameters"]) for r in layer_rows(model))

    cnn, _, static = tiny_cnn_int8()
    assert (
        "DequantizeLinear" in static.op_histogram()
        and table(static) == table(cnn)
        and len(table(cnn)) >= 2
    )  # QDQ weights ("weighted layers 0")
    mlp = tiny_mlp(in_features=64, hidden=64)
    dynamic = modelpress.quantize(
        mlp, "int8-dynamic", min_elements=1, allow_no_gain=True, show_progress=False
    )
    assert "MatMulInteger" in dynamic.op_histogram()
    # NOTE: int8-dynamic's MatMulInteger keeps the layer's name; its bias is a separate Add
    assert [r["name"] for r in layer_rows(dynamic)] == ["fc1", "fc2"]
    assert sorted(r["parameters"] for r in layer_rows(dynamic)) == sorted(
        64 * 64 if r["name"] == "fc1" else 4 * 64 for r in layer_rows(mlp)
    )
    int4 = modelpress.quantize(
        mlp,
        "int4-weight-only",
        min_elements=1,
        block_size=32,
        allow_no_gain=True,
        show_progress=False,
    )
    assert [r[0] for r in table(int4)] == [
        r[0] for r in table(mlp)
    ]  # NOTE: its Gemm becomes a MatMul behind a DequantizeLinear, named as the layer was


@pytest.mark.parametrize(
    "method, options",
    [
        ("int8-dynamic", ["-O", "min_elements=1"]),
        ("int4-weight-only", ["-O", "min_elements=1", "-O", "block_size=32"]),
        (
            "int4-weight-only",
            ["-O", "min_elements=1", "-O", "block_size=32", "-O", "format=matmulnbits"],
        ),
        ("int8-weight-only", ["-O", "min_elements=1"]),
    ],
)
def test_quantize_keeps_the_source_layer_names(tmp_path, method, options):
    """What `inspect --layers` and the report call a layer is what the source called it (issue #25:
    `fc1` came out as `fc1_MatMulInteger`), so --exclude / -O layers= take the same names after."""
    from modelpress.testing import tiny_mlp

    source, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save(tiny_mlp(in_features=64, hidden=64).to_proto(), source)
    done = run_cli_here(
        "quantize", str(source), "-m", method, *options, "--allow-no-gain", "-o", str(out)
    )
    assert done.returncode == 0, done.stderr
    names = {}
    for path in (source, out):
        shown = run_cli_here("inspect", str(path), "--layers", "--json")
        assert shown.returncode == 0, shown.stderr
        names[path] = sorted(r["name"] for r in json.loads(shown.stdout)["layers"])
    assert names[source] == names[out] == ["fc1", "fc2"]
    quantized = modelpress.load(out, show_progress=False)
    nodes = [n.name for n in quantized.nodes()]
    assert len(nodes) == len(set(nodes)) and not any("MatMul" in n for n in nodes)


def test_inspect_leaves_out_a_producer_version_of_none(tmp_path):
    path = tmp_path / "lstm.onnx"
    _lstm_file(path)
    proto = onnx.load(path)
    # NOTE: tf2onnx writes "None", or its version and the git hash it was built without
    for version, shown in (("None", "tf2onnx"), ("1.17.0 None", "tf2onnx 1.17.0")):
        proto.producer_name, proto.producer_version = "tf2onnx", version
        onnx.save(proto, path)
        loaded = modelpress.describe(modelpress.load(path, show_progress=False))
        assert loaded["producer"] == shown
        assert run_cli_here("inspect", str(path), "--json").stdout.count(f'"{shown}"') == 1
