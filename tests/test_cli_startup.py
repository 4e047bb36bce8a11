"""The command line starts fast and speaks only when asked: an import budget (no timer) for
--version/--help, -q, inspect --layers, pack's message for non-ONNX input, and a report table
that fits 80 columns."""

import io
import itertools
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest

from modelpress.testing import tiny_mlp
from tests.conftest import run_cli, run_cli_here

HEAVY = (
    "onnx",
    "onnx_ir",
    "onnxruntime",
    "numpy",
    "torch",
    "tensorflow",
    "pydantic",
    "rich",
    "sympy",
)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], []], ids=["version", "help", "bare"])
def test_version_and_help_import_no_heavy_module(argv):
    code = (
        "import sys\n"
        "from modelpress.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


# What `inspect` of an ONNX file may not import: frameworks, tuning and data-science stacks, the
# compression pipeline and report. numpy, onnx(-ir), ONNX Runtime (the normalisation check), rich and
# the built-in plugins are what it needs. sympy is not listed: onnx-ir imports it at the top of its core
# module and modelpress imports onnx-ir as it is (no stand-ins; docs/architecture.md says what it costs).
INSPECT_NEVER = (
    "torch",
    "tensorflow",
    "keras",
    "jax",
    "transformers",
    "onnxscript",
    "tf2onnx",
    "scipy",
    "sklearn",
    "pandas",
    "matplotlib",
    "PIL",
    "ray",
    "optuna",
    "zstandard",
    "modelpress.app.compress",
    "modelpress.app.pipeline",
    "modelpress.app.report",
    "modelpress.app.tuning",
    "modelpress.io.export",
    "modelpress.adapters.torch_lowering",
    "modelpress.adapters.torch_training",
)


# NOTE: the budget of `inspect` on an ONNX file: every third-party distribution it may import (top-level
# names). onnx-ir brings onnx (protobuf: google), ml_dtypes, numpy and sympy (mpmath); the registry
# brings pluggy and the built-in plugins' option schemas (pydantic); the normalisation check ONNX Runtime.
# A new name here is a start-up cost every `inspect` pays: add it only with a reason.
INSPECT_THIRD_PARTY = frozenset(
    {
        "annotated_types",
        "google",
        "ml_dtypes",
        "mpmath",
        "numpy",
        "onnx",
        "onnx_ir",
        "onnxruntime",
        "packaging",
        "pluggy",
        "pydantic",
        "pydantic_core",
        "rich",
        "sympy",
        "typing_extensions",
        "typing_inspection",
    }
)


# What `inspect` of a plain .onnx file (one loading would leave as it is) never imports: it reads the
# file with the light reader (modelpress.io.onnx_view), so none of onnx (and its ml_dtypes), onnx-ir
# (and its sympy), ONNX Runtime, the plugins or a framework.
INSPECT_PLAIN_NEVER = (
    "onnx",
    "onnx_ir",
    "ml_dtypes",
    "sympy",
    "onnxruntime",
    "torch",
    "tensorflow",
    "pluggy",
    "pydantic",
    "modelpress.plugin_api",
    "modelpress.plugin.registry",
)


def _inspect_imports(path, *argv):
    code = (
        "import sys\n"
        "from modelpress.cli import main\n"
        f"assert main(['inspect', {str(path)!r}, *{list(argv)!r}]) == 0\n"
        f"print(sorted(m for m in {INSPECT_NEVER + INSPECT_PLAIN_NEVER!r} if m in sys.modules))\n"
        "tops = {m.split('.')[0] for m in list(sys.modules) if not m.startswith('_')}\n"
        "print(sorted(tops - set(sys.stdlib_module_names) - {'modelpress'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    imported, third_party = done.stdout.strip().splitlines()[-2:]
    return set(json.loads(imported.replace("'", '"'))), set(
        json.loads(third_party.replace("'", '"'))
    )


def test_inspect_imports_only_what_it_needs(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(in_features=8, hidden=8).to_proto(), path)
    for argv in ([], ["--layers"], ["--json"]):
        imported, third_party = _inspect_imports(path, *argv)
        assert imported == set(), (argv, imported)
        assert third_party <= {"numpy", "rich"}, (argv, third_party)
    # --sample needs the loaded model (the normalisation check runs on it): the budget of a full load
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 8), np.float32))
    imported, third_party = _inspect_imports(path, "--sample", str(tmp_path / "x.npz"))
    assert "onnx_ir" in imported and not imported & set(INSPECT_NEVER), imported
    assert not third_party - INSPECT_THIRD_PARTY, third_party


@pytest.mark.slow
def test_import_modelpress_is_lazy_and_the_api_is_whole():
    code = (
        "import sys, modelpress\n"
        f"assert not [m for m in {HEAVY!r} if m in sys.modules]\n"
        "from modelpress import load, Model, pack\n"
        "import modelpress.packing.container\n"
        "assert callable(modelpress.pack) and modelpress.pack is pack and all(hasattr(modelpress, n) for n in modelpress.__all__)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    # sympy imported first (torch does that)
    code = "import sympy, modelpress, modelpress.testing\nmodelpress.describe(modelpress.testing.tiny_mlp())\n"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.fixture
def mlp(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(in_features=32, hidden=64).to_proto(), path)
    return path


def test_quiet_prints_only_the_result_line(mlp, tmp_path):
    env = {
        "MODELPRESS_PROGRESS_INTERVAL": "0.0001"
    }  # NOTE: every phase long enough for a progress line
    # NOTE: a new process, whose first load is long enough for a progress line
    loud = run_cli("prune", str(mlp), "--sparsity", "0.5", "-o", str(tmp_path / "a.onnx"), env=env)
    assert (
        loud.returncode == 0
        and "loading m.onnx" in loud.stderr
        and len(loud.stdout.strip().splitlines()) > 1
    )
    for argv in (
        ["prune", str(mlp), "--sparsity", "0.5", "-o", str(tmp_path / "b.onnx")],
        ["convert", str(mlp), "-o", str(tmp_path / "c.onnx")],
    ):
        quiet = run_cli_here(*argv, "-q", env=env)
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == "" and len(quiet.stdout.strip().splitlines()) == 1, quiet.stdout
        assert "wrote " in quiet.stdout and "verified in ONNX Runtime" in quiet.stdout


def test_inspect_layers_names_ops_shapes_and_parameters(mlp):
    shown = run_cli_here("inspect", str(mlp), "--layers")
    assert shown.returncode == 0, shown.stderr
    lines = [line.replace("│", " ").split() for line in shown.stdout.splitlines()]
    assert ["fc1", "Gemm", "64x32", "2,112", "main", "graph"] in lines and [
        "fc2",
        "Gemm",
        "4x64",
        "260",
        "main",
        "graph",
    ] in lines
    info = json.loads(run_cli_here("inspect", str(mlp), "--json").stdout)
    assert [(r["name"], r["op"], r["weight_shape"], r["parameters"]) for r in info["layers"]] == [
        ("fc1", "Gemm", [64, 32], 2112),
        ("fc2", "Gemm", [4, 64], 260),
    ]


def test_inspect_sample_must_name_the_inputs(mlp, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 32), np.float32))
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 32), np.float32))
    assert run_cli_here("inspect", str(mlp), "--sample", str(tmp_path / "x.npz")).returncode == 0
    refused = run_cli_here("inspect", str(mlp), "--sample", str(tmp_path / "x.npy"))
    assert refused.returncode == 1 and "named after the model inputs" in refused.stderr


def test_pack_of_a_non_onnx_file_says_convert_it_first(tmp_path):
    source = tmp_path / "cnn.pt2"
    source.write_bytes(b"PK\x03\x04 not onnx")
    refused = run_cli_here("pack", str(source), "-o", str(tmp_path / "cnn.mpk"))
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert (
        "pack takes an ONNX file (.onnx); convert it first: modelpress convert" in refused.stderr
        and "Wire format" not in refused.stderr
    )
    assert not (tmp_path / "cnn.mpk").exists()


def _stage(name, kind, size, figures=None, latency=(0.123, 4.567)):
    from modelpress.app.compress import StageMetrics

    return StageMetrics(
        stage=name,
        metric="accuracy",
        value=0.9731,
        size_bytes=size,
        zip_bytes=size * 9 // 10,
        parameters=size // 4,
        sparsity=0.5,
        latency_ms={"b1": latency[0], "b64": latency[1]},
        seconds=12.4,
        path="x",
        figures=figures or {},
        kind=kind,
    )


def test_a_piped_compress_report_wraps_a_long_stage_name_at_COLUMNS(capsys, monkeypatch):
    """Issue #25: piped with COLUMNS=80, a 34-character stage name did not wrap (a 93-column table):
    the report takes $COLUMNS or 80 when piped, as tune's and plugins' tables do."""
    from types import SimpleNamespace

    from modelpress.app.report import Report
    from modelpress.cli.compress import print_report

    report = Report(title="model.onnx", metric="accuracy")
    report.add(_stage("source", "", 480_000))
    report.add(_stage("prune (channels 25%, no fine-tune)", "prune", 240_000))
    report.add(_stage("quantize", "quantize", 60_000))
    for columns, width in (("80", 80), (None, 80), ("120", 120)):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        print_report(SimpleNamespace(report=report, interrupted=False))
        lines = capsys.readouterr().out.splitlines()
        assert max(len(line) for line in lines) <= width and "…" not in "".join(lines)
        whole = any("prune (channels 25%, no fine-tune)" in line for line in lines)
        assert whole == (width == 120), lines  # wraps at 80, whole at 120


def test_piped_result_lines_wrap_at_COLUMNS_and_quiet_keeps_one_line(mlp, tmp_path):
    """Issue #25: piped, the figures and the "verified in ONNX Runtime ..." line wrapped at a fixed 160
    columns whatever $COLUMNS said; they take $COLUMNS, or 80 unset, as the tables do. -q keeps its one line."""
    argv = ["prune", str(mlp), "--sparsity", "0.5", "-o", str(tmp_path / "p.onnx"), "--overwrite"]
    for columns in ("80", "", "300"):
        shown = run_cli_here(*argv, env={"COLUMNS": columns})
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        width = int(columns or 80)
        assert max(len(line) for line in lines) <= width, (columns, lines)
        verified = next(
            i for i, line in enumerate(lines) if line.startswith("verified in ONNX Runtime")
        )
        # NOTE: the line is ~210 characters: wrapped (at a space) at 80, whole at 300
        whole = lines[verified].rstrip().endswith("for real data")
        assert whole == (width == 300), lines[verified:]
        # NOTE: a wrapped line goes on indented, not flush left where it reads as a line of its own
        assert all(line.startswith("  ") for line in lines[verified + 1 :]), lines[verified:]
    quiet = run_cli_here(*argv, "-q", env={"COLUMNS": "80"})
    assert len(quiet.stdout.strip().splitlines()) == 1 and len(quiet.stdout) > 80, quiet.stdout


def test_inspect_entropy_and_summary_fit_80_columns_whole(mlp):
    """Issue #25 (80 columns): `inspect --entropy` cut its cells (`conv1…`, `entro…`, `byteg…`) and the
    summary line broke inside an item (`weighted layers` / `3`). Every cell whole within $COLUMNS."""
    for columns, packed in (("80", False), ("120", True)):
        shown = run_cli_here("inspect", str(mlp), "--entropy", env={"COLUMNS": columns})
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert max(len(line) for line in lines) <= int(columns) and "…" not in shown.stdout, lines
        assert any(line.endswith(f"weighted layers {2}") for line in lines), lines[:3]
        rows = [line for line in lines if line.startswith(("fc1.", "fc2."))]
        assert len(rows) >= 3 and all(
            re.search(r" \d+\.\d\d/32 ", row) and re.search(r" \d+\.\d\dx$", row) for row in rows
        ), rows
        assert ("packed" in shown.stdout) == packed


def test_report_table_fits_80_columns_and_uses_a_wider_terminal():
    from rich.console import Console

    from modelpress.app.report import Report

    report = Report(
        title="digits-cnn: prune -> distill -> quantize",
        metric="accuracy",
        kind_columns={
            "prune": ("sparsity",),
            "distill": ("agreement",),
            "quantize": ("model_bytes_before",),
        },
    )
    report.add(_stage("source", "", 480_000))
    report.add(_stage("prune-channels", "prune", 240_000, latency=(0.2, 9.0)))
    report.add(_stage("distill-into-the-pruned-student", "distill", 240_000, {"agreement": 0.9912}))
    report.add(_stage("quantize-int8-static", "quantize", 60_000))
    texts = {}
    for width in (80, 160):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(report.table())
        texts[width] = console.export_text()
    narrow = texts[80].splitlines()
    assert max(len(line) for line in narrow) <= 80 and "…" not in texts[80]
    for value in ("0.9731", "120,000", "8.00x", "0.9912", "4.567"):  # every number whole
        assert value in texts[80]
    # NOTE: header words whole (it showed `accurac` / `y`, `spars` / `ity`, `agreem` / `ent`): the least
    # read columns make room, named under the table; report.md keeps them
    assert all(word in texts[80] for word in ("accuracy", "sparsity", "agreement", "params"))
    assert narrow[-1] == "(not shown at 80 columns: s, zip MB; report.md has them)"
    assert "12.4" in texts[160] and "not shown" not in texts[160]
    assert (
        sum("distill-into-the" in line or "pruned-student" in line for line in narrow) == 2
    )  # wrapped once
    assert (
        "distill-into-the-pruned-student" in texts[160]
        and "sparsity" in texts[160]
        and "…" not in texts[160]
    )


def test_a_text_decoders_report_leaves_columns_out_at_80_rather_than_cut_them():
    """Issue #25 (80 columns): the huggingface guide's report (twelve number columns) showed `sourc` / `e`,
    `quant` / `ize/i` / `nt8-d` / ..., headers `perple` / `xity` and a cut time `0…`. The least read columns
    are left out of the terminal's table and named; the rest whole. A wide terminal shows them all."""
    from rich.console import Console

    from modelpress.app.report import Report

    report = Report(title="tiny-llama", metric="agreement")
    for name, size in (("source", 776_000), ("quantize/int8-dynamic", 483_000)):
        stage = _stage(name, "quantize", size, latency=(0.254, 0.684))
        stage.text = {
            "perplexity": 293.822,
            "perplexity_increase": 0.0001,
            "token_agreement": 1.0,
            "decode_tokens_per_s": 359.9,
        }
        report.add(stage)
    texts = {}
    for width in (80, 200):
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(report.table())
        texts[width] = console.export_text()
    lines = texts[80].splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in texts[80], texts[80]
    assert lines[4].startswith("source ") and lines[5].startswith("quantize/int8-"), lines
    for word in ("agreement", "change", "params", "sparsity", "+0.01%", "100.0%", "1.61x", "0.254"):
        assert word in texts[80], word
    assert " ".join(texts[80].split()).endswith(
        "(not shown at 80 columns: s, zip MB, perplexity, decode tokens/s, b64 ms; report.md has them)"
    ), texts[80]
    assert "decode" in texts[200] and "not shown" not in texts[200] and "293.822" in texts[200]


def test_inspect_sample_runs_the_normalisation_check_and_its_message_is_not_cut_mid_word(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    name = "input_" + "_".join(
        f"word{i}" for i in range(40)
    )  # NOTE: ORT's message names it: over the length limit
    weight = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["w"], value=weight),
            helper.make_node("MatMul", [name, "w"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
    )
    path = tmp_path / "long.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    np.savez(tmp_path / "good.npz", **{name: np.ones((2, 4), np.float32)})
    np.savez(tmp_path / "bad.npz", **{name: np.ones((2, 5), np.float32)})
    good = run_cli_here("inspect", str(path), "--sample", str(tmp_path / "good.npz"))
    assert good.returncode == 0 and "outputs equal the original's" in good.stdout, good.stderr
    bad = run_cli_here("inspect", str(path), "--sample", str(tmp_path / "bad.npz"))
    text = " ".join(bad.stdout.split("inputs / outputs")[0].split())
    assert (
        bad.returncode == 0
        and "Got invalid dimensions for input: ...); pass sample= to load()" in text
    ), text
    assert "word0" not in text  # NOTE: the over-long word is left out whole, not cut
    names = "".join(
        line.split("│")[2].strip() for line in bad.stdout.splitlines() if line.count("│") == 5
    )  # the name cells
    assert name in names and "…" not in bad.stdout  # the inputs table folds the name, never cuts it


def _tune_report():
    from modelpress.app.tuning.report import TrialRecord, TuneReport

    passes = [
        {"method": "channel", "options": {"ratio": 0.15}},
        {
            "method": "int8-static",
            "options": {"calibrator": "entropy", "per_channel": True, "exclude": ["conv1", "fc"]},
        },
    ]
    trials = [
        TrialRecord(n, "ok", "p", {}, passes, 0.9759, 0.0, True, 79_000, 0.024, 2.2)
        for n in (3, 235, 1000)
    ]
    return TuneReport(
        title="tune t_cnn.onnx",
        metric="accuracy",
        objective="size",
        max_drop=0.01,
        baseline={"metric": 0.9759, "size_bytes": 352_000, "latency_ms": 0.033},
        trials=trials,
        pareto=trials[:1],
        best=trials[0],
        status="search space exhausted",
    )


def test_a_piped_tune_table_is_80_columns_or_COLUMNS(capsys, monkeypatch, tmp_path):
    """Issue #25: a piped `tune` printed a 160-column table; it takes $COLUMNS or 80 as the other
    tables do, every number whole, the configuration folded into the rest."""
    from types import SimpleNamespace

    from modelpress.cli.tune import print_result

    result = SimpleNamespace(
        report=_tune_report(),
        model_path=str(tmp_path / "best.onnx"),
        meets=True,
        recipe_path=str(tmp_path / "best-recipe.yaml"),
    )
    for columns, width in ((None, 80), ("120", 120)):
        if columns is None:
            monkeypatch.delenv("COLUMNS", raising=False)
        else:
            monkeypatch.setenv("COLUMNS", columns)
        print_result(result, str(tmp_path))
        text = capsys.readouterr().out
        table = text.split("best model:")[0].splitlines()
        assert max(len(line) for line in table) == width, text
        assert "…" not in text and text.count("0.9759") >= 3 and text.count("4.46x") >= 3
        assert "int8-static(" in text and "best model:" in text
        # NOTE: the configuration breaks after a comma, a space or "(", never mid-word
        # (it showed `int8-static(calibrator` / `=entropy,`)
        rows = table[table.index(next(line for line in table if "──" in line)) + 1 :]
        for before, line in itertools.pairwise(rows):
            if line.startswith(" ") and line.strip():
                assert before.rstrip()[-1] in ",(>=", (before, line)
    # NOTE: an option wider than the column breaks after its "=", not before its comma
    from modelpress.app.tuning.report import _Configuration

    cell = _Configuration("int8-static(calibrator=percentile, per_channel=True)")
    assert cell.lines(21) == ["int8-static(", "calibrator=", "percentile,", "per_channel=True)"]
    assert cell.lines(40) == ["int8-static(calibrator=percentile,", "per_channel=True)"]
    print_result(result, str(tmp_path), quiet=True)  # -q: the result line only
    assert "".join(capsys.readouterr().out.splitlines()).strip() == (
        f"best model: {tmp_path / 'best.onnx'} (meets the criterion); recipe: "
        f"{tmp_path / 'best-recipe.yaml'}; reports: {tmp_path / 'report.html'} (.md, .json)"
    )
