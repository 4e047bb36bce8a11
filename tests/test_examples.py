"""The worked plugin examples (a method of a new kind, an adapter) and `modelpress plugins new`:
pip-installed, discovered through their entry points, and each passing its own tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import modelpress
from tests.conftest import ROOT, run_cli

EXAMPLES = ("lowrank-factorize", "sklearn-adapter")


def _pip_install(source: Path, target: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        env={**os.environ, "PIP_CONSTRAINT": ""},
    )


def _env(site: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(site), str(ROOT), os.environ.get("PYTHONPATH")])
        ),
    }
    env.pop(
        "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", None
    )  # NOTE: these tests opt in to third-party plugins
    return env


def _own_tests(package: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-c",
            str(package / "pyproject.toml"),
            str(package / "tests"),
        ],
        capture_output=True,
        text=True,
        env=_env(site),
        cwd=package,
        timeout=600,
    )


@pytest.fixture(scope="module")
def examples_site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("examples-site")
    for name in EXAMPLES:
        _pip_install(ROOT / "examples" / name, site)
    return site


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_passes_its_own_tests(examples_site, name):
    result = _own_tests(ROOT / "examples" / name, examples_site)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout


@pytest.mark.slow
def test_third_party_method_gets_generated_cli_flags(
    examples_site, digits_mlp_path, digits_npz, tmp_path, monkeypatch
):
    monkeypatch.delenv(
        "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", raising=False
    )  # NOTE: run_cli starts from os.environ
    env = _env(examples_site)
    helped = run_cli("apply", "-k", "factorize", "-m", "lowrank", "--help", env=env)
    assert (
        helped.returncode == 0
        and "--energy" in helped.stdout
        and "--rank" in helped.stdout
        and "options of factorize/lowrank" in helped.stdout
    )
    out = tmp_path / "lowrank.onnx"
    result = run_cli(
        "apply",
        str(digits_mlp_path),
        "-k",
        "factorize",
        "-m",
        "lowrank",
        "--rank",
        "8",
        "--min-elements",
        "1",
        "--exclude",
        "fc1",
        "-o",
        str(out),
        "--sample",
        str(digits_npz),
        "--accept-loss",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "verified in ONNX Runtime" in result.stdout
    written = onnx.load(out)
    assert [n.op_type for n in written.graph.node].count("MatMul") == 2  # fc0 in two; fc1 excluded
    record = modelpress.load(out).provenance.passes[-1]
    assert (record.kind, record.method, record.figures["rank"], record.figures["skipped"]) == (
        "factorize",
        "lowrank",
        8,
        {"fc1": "excluded"},
    )


@pytest.mark.slow
def test_plugins_new_scaffolds_a_package_that_installs_and_passes(tmp_path, monkeypatch):
    monkeypatch.delenv("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    result = run_cli("plugins", "new", "clip-small", "--dir", str(tmp_path / "pkg"))
    assert result.returncode == 0, result.stderr
    site = tmp_path / "site"
    _pip_install(tmp_path / "pkg", site)
    listing = json.loads(run_cli("plugins", "--json", env=_env(site)).stdout)
    plugin = next(p for p in listing["plugins"] if p["name"] == "clip-small")
    assert plugin["distribution"] == "modelpress-clip-small" and [
        m["name"] for m in plugin["methods"]
    ] == ["clip-small"]
    tested = _own_tests(tmp_path / "pkg", site)
    assert tested.returncode == 0 and "1 passed" in tested.stdout, (
        tested.stdout[-3000:] + tested.stderr[-2000:]
    )
    again = run_cli("plugins", "new", "clip-small", "--dir", str(tmp_path / "pkg"))
    assert again.returncode == 1 and "not an empty folder" in again.stderr
    assert run_cli("plugins", "new", "Bad_Name").returncode == 1


def test_scaffold_names_are_checked(tmp_path):
    from modelpress.app.scaffold import new_plugin

    with pytest.raises(modelpress.OptionsError, match="lower-case"):
        new_plugin("-x", tmp_path / "a")
    assert np.all(
        [
            p.exists()
            for p in (new_plugin("ok2", tmp_path / "b") / "src" / "modelpress_ok2").iterdir()
        ]
    )
