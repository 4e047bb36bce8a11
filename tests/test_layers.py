"""The one-way dependency contract (pyproject.toml [tool.importlinter]) holds, and it really bites."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("importlinter", reason="needs import-linter (the test extra)")


def _script():
    spec = importlib.util.spec_from_file_location("lint_imports", ROOT / ".ci" / "lint_imports.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _lint(tree: Path) -> subprocess.CompletedProcess[str]:
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    return subprocess.run(
        [sys.executable, "-c", code, str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_layer_contracts_are_kept():
    result = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "lint_imports.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 kept, 0 broken" in result.stdout


def test_an_upward_import_and_a_plugin_reaching_into_adapters_are_caught(tmp_path):
    package = _script().assemble(tmp_path)
    with (package / "ir" / "model.py").open("a") as f:
        f.write(
            "\n\ndef _bad() -> None:\n    from modelpress.app import compress  # IR -> application\n"
        )
    with (package / "plugins" / "distill" / "__init__.py").open("a") as f:
        f.write(
            "\n\ndef _bad2() -> None:\n    from modelpress.adapters import onnx  # plugin -> adapter\n"
        )
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "2 broken" in result.stdout
    assert "modelpress.ir.model -> modelpress.app.compress" in result.stdout
    assert "modelpress.plugins.distill -> modelpress.adapters.onnx" in result.stdout


def test_a_plugin_importing_core_internals_and_a_module_outside_every_layer_are_caught(tmp_path):
    package = _script().assemble(tmp_path)
    with (package / "plugins" / "prune" / "__init__.py").open("a") as f:
        f.write(
            "\n\ndef _bad() -> None:\n    from modelpress.ir import model  # not through plugin_api\n"
        )
    with (package / "plugins" / "quantize" / "qat.py").open("a") as f:
        f.write(
            "\n\ndef _bad2() -> None:\n    from modelpress.plugins import distill  # another plugin's internals\n"
        )
    (package / "stray.py").write_text('"""A module in no layer."""\n')
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "3 broken" in result.stdout
    assert (
        "modelpress.plugins.quantize is not allowed to import modelpress.plugins.distill"
        in result.stdout
    )
    assert "modelpress.plugins.prune -> modelpress.ir.model" in result.stdout
    assert "modelpress.stray" in result.stdout


def test_every_source_folder_is_a_listed_package():
    """A wheel holds only the packages pyproject.toml lists: a new folder under core/ (a layer) must be listed."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {v: k for k, v in config["package-dir"].items()}
    found = set()
    for folder, package in roots.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            if "build" in init.parts or "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((package, *rel)))
    assert found == listed, (
        f"missing from pyproject: {sorted(found - listed)}; listed but absent: {sorted(listed - found)}"
    )
