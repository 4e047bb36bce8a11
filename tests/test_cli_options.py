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
    code = main(
        [
            "apply",
            str(mlp_file),
            "-m",
            "magnitude",
            "--sparsity",
            "0.3",
            "--exclude",
            "fc2",
            "--op-types",
            "Gemm,MatMul",
            "--min-elements",
            "1",
            "-o",
            str(out),
            "-q",
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert _zeros(out, "fc1") == pytest.approx(0.3, abs=0.01) and _zeros(out, "fc2") == 0.0
    # a list option as a repeated flag; the shortcut command keeps its own --sparsity
    code = main(
        [
            "prune",
            str(mlp_file),
            "--sparsity",
            "0.5",
            "--exclude",
            "fc1",
            "--exclude",
            "fc2",
            "--rule",
            "fraction",
            "-o",
            str(tmp_path / "none.onnx"),
            "-q",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1 and "'fc1': 'excluded by option', 'fc2': 'excluded by option'" in err


def test_help_lists_the_methods_options_and_bad_values_are_usage_errors(mlp_file, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["apply", "-m", "magnitude", "--help"])
    text = capsys.readouterr().out
    assert (
        "options of prune/magnitude" in text
        and "--rule {fraction,median,threshold}" in text
        and "repeat the flag" in text
    )
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    assert "--max-samples" in capsys.readouterr().out  # int8-static, the default method
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "apply",
                str(mlp_file),
                "-m",
                "magnitude",
                "--rule",
                "bogus",
                "-o",
                str(tmp_path / "x.onnx"),
            ]
        )
    assert exc.value.code == 1 and "invalid choice: 'bogus'" in capsys.readouterr().err
    assert (
        main(
            [
                "apply",
                str(mlp_file),
                "-m",
                "magnitude",
                "--sparsity",
                "2",
                "-o",
                str(tmp_path / "y.onnx"),
                "-q",
            ]
        )
        == 1
    )
    assert "sparsity" in capsys.readouterr().err


def test_python_dash_m_modelpress_runs_the_command_line():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "modelpress", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("modelpress ")


def test_one_option_parser_reads_flags_and_pairs_by_the_schema():
    """Flags and -O pairs become one dict, each value read as its field's type says (no table of
    built-in names: the schema here is a made-up method's)."""
    import argparse
    from typing import Literal

    from pydantic import Field

    from modelpress.cli.options import add_method_flags, method_options, method_probe

    class Opts(modelpress.Options):
        label: str | None = Field(None, description="a name")
        level: Literal["1", "2"] = "1"
        bits: Literal[4, 8] = 8
        layers: list[str] = Field(default_factory=list)
        scale: float = 1.0
        fused: bool = True
        data: str = "x"

    method = modelpress.Method(
        name="made-up", kind="prune", apply=lambda model, options, context: None, options=Opts
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("--data")  # NOTE: the command's own flag wins over the option of that name
    parser.add_argument("-O", "--option", action="append")
    add_method_flags(parser, method)
    args = parser.parse_args(
        [
            "--label",
            "123",
            "--level",
            "2",
            "--bits",
            "4",
            "--layers",
            "1,b",
            "--layers",
            '["c"]',
            "--no-fused",
            "-O",
            "scale=0.5",
            "-O",
            "layers=ignored",
            "-O",
            "data=y",
            "--data",
            "file.npz",
        ]
    )
    options = method_options(Opts, args.option, args)
    assert options == {
        "label": "123",
        "level": "2",
        "bits": 4,
        "layers": ["1", "b", "c"],
        "fused": False,
        "scale": 0.5,
        "data": "y",
    }
    assert method.validate_options(options).layers == ["1", "b", "c"] and args.data == "file.npz"
    help_text = parser.format_help()
    assert (
        "--level {1,2}" in help_text
        and "--fused, --no-fused" in help_text
        and "a name" in help_text
    )
    assert method_probe(
        ["m.onnx", "-O", "x=1", "--method", "channel", "-k", "prune"],
        default="magnitude",
        kind=None,
    ) == ("channel", "prune")
    assert method_probe(["m.onnx", "-m"], default="magnitude", kind="prune") == (
        "magnitude",
        "prune",
    )  # the real parse reports it
