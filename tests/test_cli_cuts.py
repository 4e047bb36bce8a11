"""Small CLI wording and layout cuts a new user met: what convert says it did, and table widths when piped."""

from __future__ import annotations

import modelpress
from modelpress.ir.provenance import Provenance
from modelpress.testing import tiny_mlp
from tests.conftest import run_cli, run_cli_here


def test_convert_of_an_onnx_file_says_it_read_onnx_not_the_first_import(tmp_path):
    model = tiny_mlp()
    model.provenance = Provenance(
        source_framework="torch",
        source_version="2.13.0+cpu",
        source="net.pt2",
        importer="torch.onnx.export(dynamo=True)",
        extra={"import_check": {"max_abs_diff": 1e-7}},
    )
    modelpress.export(model, tmp_path / "net.onnx", verify=False)
    proc = run_cli_here("convert", str(tmp_path / "net.onnx"), "-o", str(tmp_path / "copy.onnx"))
    assert proc.returncode == 0, proc.stderr
    first = " ".join(proc.stdout.split())  # NOTE: piped, lines wrap at $COLUMNS or 80
    assert first.startswith(f"read {tmp_path / 'net.onnx'} (ONNX; first imported from torch"), (
        proc.stdout
    )
    assert (
        "imported" not in first.split("(")[0] and "import verified against torch" not in proc.stdout
    )


def test_plugins_listing_fits_80_columns_when_piped():
    proc = run_cli("plugins", env={"COLUMNS": ""})
    assert proc.returncode == 0, proc.stderr
    widest = max(len(line) for line in proc.stdout.splitlines())
    assert "installed plugins" in proc.stdout and widest <= 80, widest
    wide = run_cli_here("plugins", env={"COLUMNS": "120"})
    assert max(len(line) for line in wide.stdout.splitlines()) <= 120


def test_plugins_never_cuts_a_method_or_option_name_at_80_columns():
    """Issue #25: `quantize/int4-weight-onl…`, `validation_fract…` at 80 columns; names are what
    users type, so the description columns wrap instead and every name shows whole."""
    proc = run_cli_here("plugins", env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    registry = modelpress.get_registry()
    names = [m.qualname for p in registry.plugins.values() for m in p.methods]
    assert "quantize/int4-weight-only" in names
    for name in names:
        assert any(name in line for line in lines), name
    for p in registry.plugins.values():
        for m in p.methods:
            for row in m.option_rows():
                assert any(f" {row['name']} " in line for line in lines), row["name"]


def test_plugins_wraps_a_method_summary_under_itself_at_80_columns():
    """At 80 columns a method's summary went on flush left (`+ float codebook` on a line of its own,
    read as another entry); its continuation lines are indented under the method."""
    proc = run_cli_here("plugins", env={"COLUMNS": "80"})
    lines = proc.stdout.splitlines()
    registry = modelpress.get_registry()
    checked = 0
    for m in (m for p in registry.plugins.values() for m in p.methods):
        head = next(i for i, line in enumerate(lines) if line.startswith(f"  {m.name}  ("))
        text = lines[head]
        for line in lines[head + 1 :]:
            if not line.startswith("      "):
                break
            text += " " + line.strip()
        assert text.endswith(" ".join(m.summary.split())), (text, m.summary)
        checked += len(text) > 80
    assert checked, "no summary long enough to wrap at 80 columns"
