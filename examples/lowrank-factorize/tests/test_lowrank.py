import numpy as np

import modelpress
from modelpress.testing import check_method, tiny_mlp


def test_each_matmul_becomes_two_smaller_ones():
    model = tiny_mlp(in_features=32, hidden=64, classes=10)
    result = check_method("lowrank", model, kind="factorize", rank=4, min_elements=1)
    ops = [node.op_type for node in result.graph]
    assert "Gemm" not in ops and ops.count("MatMul") == 4
    figures = result.provenance.passes[-1].figures
    assert figures["rank"] == 4 and figures["parameters_after"] < figures["parameters_before"]
    assert result.parameter_count() == figures["parameters_after"]


def test_energy_finds_the_true_rank_and_keeps_outputs():
    model = tiny_mlp(in_features=32, hidden=64, classes=10)
    rng = np.random.default_rng(0)
    low = (rng.standard_normal((64, 3)) @ rng.standard_normal((3, 32))).astype(
        np.float32
    )  # fc1 is [out, in], rank 3
    model.replace_initializer("fc1.weight", low)
    result = modelpress.apply(
        model,
        "lowrank",
        kind="factorize",
        energy=0.9999,
        min_elements=1,
        exclude=["fc2"],
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    assert figures["layers"] == {"fc1": 3} and figures["skipped"] == {"fc2": "excluded"}
    x = rng.standard_normal((8, 32)).astype(np.float32)
    assert modelpress.verify(result, sample={"x": x}).cosine > 0.99999
