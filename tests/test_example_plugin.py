"""The third-party plugin in examples/plugin-template, pip-installed, discovered and run end to end."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import modelpress
from modelpress.runtime.session import make_session, run
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.slow  # NOTE: the example_plugin fixture pip-installs the plugin


def test_listed_by_modelpress_plugins(example_plugin):
    data = json.loads(run_cli("plugins", "--json").stdout)
    plugin = next(p for p in data["plugins"] if p["name"] == "fp16-weights")
    assert plugin["distribution"] == "modelpress-fp16-weights" and not plugin["builtin"]
    (method,) = plugin["methods"]
    assert method["kind"] == "quantize" and method["name"] == "fp16-weights"
    assert {o["name"] for o in method["options"]} == {"min_elements", "exclude"}
    table = run_cli("plugins").stdout
    assert "fp16-weights" in table and "min_elements" in table


def test_runs_end_to_end_from_the_cli(
    example_plugin, digits_mlp_path, digits_npz, digits, tmp_path
):
    out = tmp_path / "half.onnx"
    result = run_cli(
        "apply",
        str(digits_mlp_path),
        "-m",
        "fp16-weights",
        "-o",
        str(out),
        "--sample",
        str(digits_npz),
    )
    assert result.returncode == 0, result.stderr
    assert "verified in ONNX Runtime" in result.stdout
    assert out.stat().st_size < 0.6 * digits_mlp_path.stat().st_size
    model = modelpress.load(out)
    (record,) = model.provenance.passes
    assert (record.plugin, record.plugin_version, record.figures["converted"]) == (
        "fp16-weights",
        "0.1.0",
        3,
    )  # fc1.weight, fc1.bias, fc2.weight; fc2.bias < 16 elements
    (logits,) = run(make_session(out), {"x": digits["x_test"]})
    (reference,) = run(make_session(digits_mlp_path), {"x": digits["x_test"]})
    assert np.mean(logits.argmax(1) == reference.argmax(1)) >= 0.998
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in onnx.load(out).graph.initializer)


def test_plugin_own_tests_pass(example_plugin):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "examples" / "plugin-template" / "tests"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT / "examples" / "plugin-template",
    )
    assert result.returncode == 0, result.stdout + result.stderr
