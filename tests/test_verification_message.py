"""Verification says how many inputs it ran and whether they were random (issue #25: "verification on
2 random inputs when no --sample is given, silently")."""

import numpy as np
import onnx

import modelpress
from modelpress.testing import tiny_mlp
from tests.conftest import run_cli_here


def test_verification_names_its_inputs_count_and_whether_they_were_random(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(in_features=16, hidden=32).to_proto(), path)
    np.savez(
        tmp_path / "s.npz", x=np.random.default_rng(0).standard_normal((5, 16)).astype(np.float32)
    )
    random = run_cli_here("prune", str(path), "--sparsity", "0.3", "-o", str(tmp_path / "a.onnx"))
    text = " ".join(random.stdout.split())
    assert (
        random.returncode == 0
        and "on 2 random inputs — pass --sample (sample=) for real data" in text
    ), text
    real = run_cli_here(
        "prune",
        str(path),
        "--sparsity",
        "0.3",
        "-o",
        str(tmp_path / "b.onnx"),
        "--sample",
        str(tmp_path / "s.npz"),
    )
    text = " ".join(real.stdout.split())
    assert real.returncode == 0 and "on 5 samples" in text and "random" not in text, text
    model = modelpress.load(path, show_progress=False)
    assert (
        modelpress.verify(model).random_inputs
        and modelpress.verify(model).to_dict()["random_inputs"]
    )
    assert not modelpress.verify(model, sample=str(tmp_path / "s.npz")).random_inputs
