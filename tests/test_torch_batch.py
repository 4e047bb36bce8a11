"""A torch.export program saved with a fixed batch (``torch.export.export(net, (x[:2],))``, the usual call)
imports with a dynamic batch where its graph allows it, and says plainly when it does not (issue #25)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import modelpress
from modelpress.runtime.session import make_session, run
from tests.conftest import run_cli

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 16, 10),
    ).eval()


class _PairwiseNet(torch.nn.Module):
    """Reshapes by its example's batch: a graph that only works at batch 2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.reshape(2, -1)) + x.sum()


def test_a_fixed_batch_program_imports_with_a_dynamic_batch(tmp_path):
    net = _cnn()
    path = tmp_path / "cnn.pt2"
    torch.export.save(torch.export.export(net, (torch.zeros(2, 1, 8, 8),)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # NOTE: nothing to say: the batch is free
        model = modelpress.load(path, show_progress=False)
    assert model.signature.inputs[0].shape[0] == model.signature.outputs[0].shape[0] == "batch"
    assert [layer.name for layer in model.weighted_layers()] == ["layer0", "layer4"]
    x = np.random.default_rng(0).standard_normal((5, 1, 8, 8)).astype(np.float32)
    session = make_session(model)
    got = run(session, {model.signature.inputs[0].name: x})[0]
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 10) and np.allclose(got, want, atol=1e-5)


def test_a_program_whose_graph_needs_its_batch_says_so_and_how_to_fix_it(tmp_path):
    program = torch.export.export(_PairwiseNet().eval(), (torch.zeros(2, 1, 8, 8),))
    with pytest.warns(
        UserWarning, match=r"fixed batch of 2 .*dynamic_shapes=\(\{0: torch.export.Dim\('batch'\)\}"
    ):
        model = modelpress.load(program, show_progress=False)
    assert model.signature.inputs[0].shape[0] == 2
    # the command line says it in one warning line; the failed re-trace is expected, not logged
    torch.export.save(program, tmp_path / "pair.pt2")
    done = run_cli("convert", str(tmp_path / "pair.pt2"), "-o", str(tmp_path / "pair.onnx"), "-q")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and lines[0].startswith("modelpress: warning: ")
        and "fixed batch of 2" in lines[0]
    )
