"""CLI flags generated from each method's Options schema (the same for built-in and third-party methods)."""

import numpy as np
import onnx
import pytest

import modelpress
from modelpress.cli import main
from modelpress.testing import tiny_mlp


@pytest.fixture
def mlp_file(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(tiny_mlp(in_features=32, hidden=64).to_proto(), path)
    return path


def _zeros(path, name):
    layer = next(layer for layer in modelpress.load(path).weighted_layers() if layer.name == name)
    return float(np.mean(layer.weight_array() == 0))


def test_generated_flags_reach_the_method(mlp_file, tmp_path, capsys):
    out = tmp_path / "pruned.onnx"
    code = main(["apply", str(mlp_file), "-m", "magnitude", "--sparsity", "0.3", "--exclude", "fc2",
                 "--op-types", "Gemm,MatMul", "--min-elements", "1", "-o", str(out), "-q"])
    assert code == 0, capsys.readouterr().err
    assert _zeros(out, "fc1") == pytest.approx(0.3, abs=0.01) and _zeros(out, "fc2") == 0.0
    # a list option as a repeated flag; the shortcut command keeps its own --sparsity
    code = main(["prune", str(mlp_file), "--sparsity", "0.5", "--exclude", "fc1", "--exclude", "fc2", "--rule", "fraction",
                 "-o", str(tmp_path / "none.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 1 and "'fc1': 'excluded by option', 'fc2': 'excluded by option'" in err


def test_help_lists_the_methods_options_and_bad_values_are_usage_errors(mlp_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["apply", "-m", "magnitude", "--help"])
    text = capsys.readouterr().out
    assert "options of prune/magnitude" in text and "--rule {fraction,median,threshold}" in text and "repeat the flag" in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--max-samples" in capsys.readouterr().out  # int8-static, the default method
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(mlp_file), "-m", "magnitude", "--rule", "bogus", "-o", str(tmp_path / "x.onnx")])
    assert exc.value.code == 1 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert main(["apply", str(mlp_file), "-m", "magnitude", "--sparsity", "2", "-o", str(tmp_path / "y.onnx"), "-q"]) == 1
    assert "sparsity" in capsys.readouterr().err


def test_python_dash_m_modelpress_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "modelpress", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("modelpress ")
