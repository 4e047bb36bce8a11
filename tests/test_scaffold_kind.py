"""`modelpress plugins new NAME --kind K`: a method of any kind; a kind nobody defines is declared by the new package."""

from __future__ import annotations

import importlib.util

import pytest

import modelpress
from modelpress.app.scaffold import new_plugin
from modelpress.testing import check_method, tiny_cnn
from tests.conftest import run_cli_here


def _module(target, name):
    ident = name.replace("-", "_")
    spec = importlib.util.spec_from_file_location(
        f"modelpress_{ident}", target / "src" / f"modelpress_{ident}" / "__init__.py"
    )
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def test_a_new_kind_is_declared_by_the_scaffolded_package_and_its_method_runs(tmp_path):
    target = new_plugin("low-fact", tmp_path / "pkg", kind="factorize")
    module = _module(target, "low-fact")
    registry = modelpress.create_registry(plugins=[module])
    kind = next(k for k in registry.kinds() if k.name == "factorize")
    assert (
        kind.min_cosine == 0.9 and "modelpress-low-fact" in kind.description
    )  # NOTE: the default floor
    result = check_method(
        "low-fact", tiny_cnn(channels=8), kind="factorize", registry=registry, fraction=0.2
    )
    assert (
        result.provenance.passes[-1].kind == "factorize"
        and 0 < result.provenance.passes[-1].figures["sparsity"] < 1
    )
    assert "-k factorize -m low-fact" in (target / "README.md").read_text()


def test_an_installed_kind_is_not_declared_again(tmp_path):
    target = new_plugin("thin", tmp_path / "pkg", kind="prune")
    source = (target / "src" / "modelpress_thin" / "__init__.py").read_text()
    assert "modelpress_register_kinds" not in source and 'kind="prune"' in source


def test_a_bad_kind_name_is_refused(tmp_path):
    with pytest.raises(modelpress.OptionsError, match=r"'Bad Kind' is not a valid kind name"):
        new_plugin("thin", tmp_path / "pkg", kind="Bad Kind")
    refused = run_cli_here(
        "plugins", "new", "thin", "--dir", str(tmp_path / "cli"), "--kind", "Bad Kind"
    )
    assert (
        refused.returncode == 1
        and "not a valid kind name" in refused.stderr
        and not (tmp_path / "cli").exists()
    )
