"""A framework file is exported to ONNX on every command: the first load says once to convert it
(issue #25: a .pt2 cost 13-28 s on every command with no hint); -q and ONNX files stay quiet."""

import pytest

from tests.conftest import run_cli


@pytest.mark.torch
@pytest.mark.slow  # NOTE: exports the program three times (~20 s each on a loaded machine)
def test_a_pt2_file_gets_a_hint_to_convert_it_once(tmp_path):
    torch = pytest.importorskip("torch")
    module = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(module, (torch.randn(2, 8),)), path)
    shown = run_cli("inspect", str(path))
    assert shown.returncode == 0, shown.stderr
    hint = f"convert it once and use the .onnx: modelpress convert {path} -o net.onnx"
    assert shown.stderr.count(hint) == 1 and "was exported to ONNX in" in shown.stderr, shown.stderr
    quiet = run_cli("inspect", str(path), "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    converted = run_cli("convert", str(path), "-o", str(tmp_path / "net.onnx"), "-q")
    assert converted.returncode == 0 and hint not in converted.stderr, converted.stderr
    onnx_file = run_cli("inspect", str(tmp_path / "net.onnx"))
    assert onnx_file.returncode == 0 and "modelpress convert" not in onnx_file.stderr
