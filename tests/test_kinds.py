"""Open pass kinds: a plugin registers a new kind (here: low-rank factorization) and gets the same
treatment as the built-in ones (listing, -k choices, reports of its figures, recipes)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from pydantic import Field

import modelpress
from modelpress import Kind, Method, Options
from modelpress.cli import main
from modelpress.plugin import registry as registry_module
from modelpress.testing import tiny_mlp


class RankOptions(Options):
    rank: int = Field(2, ge=1, description="rank kept in each weight matrix")


def low_rank(model, options, context):
    """Replace each 2-D weight by its best rank-k approximation (truncated SVD)."""
    errors = []
    for layer in model.weighted_layers():
        w = layer.weight_array()
        if w.ndim != 2:
            continue
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        k = min(options.rank, len(s))
        approx = (u[:, :k] * s[:k]) @ vt[:k]
        model.replace_initializer(layer.weight.name, approx.astype(w.dtype))
        errors.append(float(np.linalg.norm(w - approx) / np.linalg.norm(w)))
    context.figures["rank"] = options.rank
    context.figures["relative_error"] = round(max(errors), 6)


class LowRankPlugin:
    @modelpress.hookimpl
    def modelpress_register_kinds(self, register):
        register(
            Kind(
                "factorize",
                "replace weight matrices by low-rank factors",
                columns=("rank", "relative_error"),
            )
        )

    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="svd",
                kind="factorize",
                apply=low_rank,
                options=RankOptions,
                summary="truncated SVD",
            )
        )


def test_a_plugin_adds_a_kind_and_its_method_runs():
    registry = modelpress.create_registry(plugins=[LowRankPlugin()])
    assert [k.name for k in registry.kinds()][:3] == ["quantize", "prune", "distill"]
    kind = registry.kind("factorize")
    assert (kind.description, kind.columns, kind.plugin) == (
        "replace weight matrices by low-rank factors",
        ("rank", "relative_error"),
        "LowRankPlugin",
    )
    model = tiny_mlp()
    result = modelpress.apply(
        model, "svd", kind="factorize", registry=registry, rank=1, show_progress=False
    )
    record = result.provenance.passes[-1]
    assert (record.kind, record.method, record.figures["rank"]) == ("factorize", "svd", 1)
    for layer in result.weighted_layers():
        assert np.linalg.matrix_rank(layer.weight_array()) == 1
    assert 0 < record.figures["relative_error"] < 1


def test_a_kind_declared_only_by_a_method_exists_and_unknown_kinds_are_named():
    class Declares:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="svd", kind="factorize", apply=low_rank, options=RankOptions))

    registry = modelpress.create_registry(plugins=[Declares()])
    assert registry.kind("factorize") == Kind("factorize", plugin="")
    assert registry.method("svd", "factorize").kind == "factorize"
    with pytest.raises(
        modelpress.UnknownMethodError,
        match=r"unknown method kind 'fuse'; installed kinds: quantize, prune, distill, factorize",
    ):
        registry.method("svd", "fuse")


def test_conflicting_kind_declarations_name_both_plugins():
    class Other:
        @modelpress.hookimpl
        def modelpress_register_kinds(self, register):
            register(Kind("factorize", "something else"))

    with pytest.raises(
        modelpress.DuplicateMethodError,
        match=r"kind 'factorize' is registered differently by both LowRankPlugin .* and Other",
    ):
        modelpress.create_registry(plugins=[LowRankPlugin(), Other()])


def test_cli_kind_choices_and_listing_come_from_the_registry(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        registry_module, "_default", modelpress.create_registry(plugins=[LowRankPlugin()])
    )
    source = tmp_path / "m.onnx"
    onnx.save(tiny_mlp().to_proto(), source)
    out = tmp_path / "f.onnx"
    assert (
        main(
            [
                "apply",
                str(source),
                "-k",
                "factorize",
                "-m",
                "svd",
                "-O",
                "rank=16",
                "-o",
                str(out),
                "-q",
            ]
        )
        == 0
    ), capsys.readouterr().err
    written = modelpress.load(out)
    assert [(p.kind, p.method) for p in written.provenance.passes] == [("factorize", "svd")]
    capsys.readouterr()
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {
        "name": "factorize",
        "description": "replace weight matrices by low-rank factors",
        "columns": ["rank", "relative_error"],
        "smaller": False,
        "plugin": "LowRankPlugin",
    } in listing["kinds"]
    assert main(["plugins"]) == 0
    assert (
        "factorize methods - replace weight matrices by low-rank factors" in capsys.readouterr().out
    )
    with pytest.raises(SystemExit):
        main(["apply", str(source), "-k", "fuse", "-m", "svd", "-o", str(out)])
    assert "invalid choice: 'fuse'" in capsys.readouterr().err


def test_report_columns_come_from_each_stages_kind():
    from modelpress.app.compress import StageMetrics
    from modelpress.app.report import Report

    registry = modelpress.create_registry(plugins=[LowRankPlugin()])
    model = tiny_mlp()
    result = modelpress.apply(
        model, "svd", kind="factorize", registry=registry, rank=1, show_progress=False
    )

    def stage(name, kind, figures, sparsity=0.0):
        return StageMetrics(
            stage=name,
            metric="agreement",
            value=1.0,
            size_bytes=1000,
            zip_bytes=900,
            parameters=10,
            sparsity=sparsity,
            latency_ms={},
            seconds=0.1,
            path="x.onnx",
            figures=figures,
            kind=kind,
        )

    columns = {k.name: k.columns for k in registry.kinds()}
    figures = result.provenance.passes[-1].figures
    report = Report(
        "r",
        "agreement",
        [stage("source", "", {}), stage("svd", "factorize", figures)],
        kind_columns=columns,
    )
    assert report.figure_columns() == ["rank", "relative_error"]
    assert "sparsity" not in report.columns()
    row = report.rows()[1]
    assert (
        row[report.columns().index("rank")] == "1"
        and row[report.columns().index("relative_error")] == f"{figures['relative_error']:.4g}"
    )
    assert report.rows()[0][report.columns().index("rank")] == "-"
    report.add(stage("magnitude", "prune", {"layers": 2}, sparsity=0.5))
    assert report.figure_columns() == ["rank", "relative_error", "sparsity"]
    assert report.rows()[2][report.columns().index("sparsity")] == "50.0%"
    assert "| rank |" in report.markdown()
