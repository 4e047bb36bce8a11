import numpy as np

import modelpress
from modelpress.testing import check_method, tiny_cnn


def test_fp16_weights_halves_weights_and_keeps_outputs():
    model = tiny_cnn(channels=8)
    result = check_method("fp16-weights", model, kind="quantize")
    figures = result.provenance.passes[-1].figures
    assert figures["converted"] >= 3
    assert result.weight_bytes() < model.weight_bytes() * 0.6
    comparison = modelpress.verify(result)
    assert comparison.cosine > 0.9999
    assert np.isfinite(comparison.max_abs_diff)
