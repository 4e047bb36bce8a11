"""The command line, run as a user runs it (a subprocess)."""

import json

import pytest
from onnx import TensorProto, helper

from tests.conftest import run_cli, run_cli_here


def _one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("modelpress: error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_help_everywhere():
    for args in ([], ["inspect"], ["plugins"], ["apply"]):
        result = run_cli(*args, "--help")
        assert result.returncode == 0 and "usage: modelpress" in result.stdout


@pytest.mark.slow
def test_inspect_tables_and_json(digits_mlp_path):
    result = run_cli("inspect", str(digits_mlp_path))
    assert result.returncode == 0, result.stderr
    for fragment in ("digits_mlp.onnx", "opset 17", "parameters 4,810", "Gemm", "logits", "batch"):
        assert fragment in result.stdout
    info = json.loads(run_cli("inspect", str(digits_mlp_path), "--json").stdout)
    assert info["ops"] == {"Gemm": 2, "Relu": 1}
    assert info["size_on_disk"] == digits_mlp_path.stat().st_size


def test_plugins_lists_builtins():
    data = json.loads(run_cli_here("plugins", "--json").stdout)
    builtin = {p["name"] for p in data["plugins"] if p["builtin"]}
    assert "onnx" in builtin


@pytest.mark.parametrize(
    ("content", "fragment"),
    [(b"", "empty"), (b"hello, this is text\n" * 3, "not"), (None, "truncated")],
    ids=["empty", "text", "truncated"],
)
@pytest.mark.slow
def test_bad_model_files_one_line_error_and_nothing_written(
    tmp_path, digits_mlp_path, content, fragment
):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content if content is not None else digits_mlp_path.read_bytes()[:300])
    for args in (
        ["inspect", str(bad)],
        ["apply", str(bad), "-m", "fp16-weights", "-o", str(tmp_path / "out.onnx")],
    ):
        _one_line_error(run_cli(*args), "bad.onnx", fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_external_data_escape_via_cli(tmp_path):
    tensor = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [tensor],
    )
    path = tmp_path / "evil.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    _one_line_error(
        run_cli_here("inspect", str(path)),
        "evil.onnx",
        "../../etc/passwd",
        "outside the model's folder",
    )


@pytest.mark.slow
def test_op_ort_does_not_know(tmp_path, example_plugin):
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example", name="frob")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    proto.ir_version = 8
    path = tmp_path / "custom.onnx"
    path.write_bytes(proto.SerializeToString())
    out = tmp_path / "out.onnx"
    # NOTE: the method has nothing to do on this graph (no gain); the export error is under test here
    _one_line_error(
        run_cli("apply", str(path), "-m", "fp16-weights", "-o", str(out), "--allow-no-gain"),
        "Frobnicate",
        "nothing was written",
    )
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["custom.onnx"]


@pytest.mark.slow
def test_unknown_method_and_bad_option(digits_mlp_path, tmp_path, example_plugin):
    _one_line_error(
        run_cli("apply", str(digits_mlp_path), "-m", "nosuch", "-o", str(tmp_path / "o.onnx")),
        "nosuch",
        "installed:",
    )
    _one_line_error(
        run_cli(
            "apply",
            str(digits_mlp_path),
            "-m",
            "fp16-weights",
            "-O",
            "min_elemnts=3",
            "-o",
            str(tmp_path / "o.onnx"),
        ),
        "did you mean 'min_elements'",
    )
    assert list(tmp_path.iterdir()) == []


def test_verbose_shows_the_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    result = run_cli_here("--verbose", "inspect", str(bad))
    assert result.returncode != 0 and "Traceback" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "form",
    [
        ["-O", "layers=fc0", "-O", "layers=fc1"],
        ["-O", "layers=fc0,fc1"],
        ["-O", 'layers=["fc0", "fc1"]'],
    ],
)
def test_list_options_as_repeated_flags_comma_lists_or_json(digits_mlp_path, tmp_path, form):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    def sparsity(path):
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(path).graph.initializer}
        return {name: float(np.mean(weights[f"{name}.weight"] == 0)) for name in ("fc0", "fc1")}

    both = run_cli(
        "prune",
        str(digits_mlp_path),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        *form,
        "-o",
        str(tmp_path / "both.onnx"),
        "-q",
    )
    assert both.returncode == 0, both.stderr
    assert all(abs(s - 0.5) < 0.01 for s in sparsity(tmp_path / "both.onnx").values())
    one = run_cli(
        "prune",
        str(digits_mlp_path),
        "--method",
        "magnitude",
        "--sparsity",
        "0.5",
        "-O",
        "layers=fc1",
        "-o",
        str(tmp_path / "one.onnx"),
        "-q",
    )
    assert one.returncode == 0, one.stderr
    assert (
        sparsity(tmp_path / "one.onnx")["fc0"] < 0.01
        and abs(sparsity(tmp_path / "one.onnx")["fc1"] - 0.5) < 0.01
    )
