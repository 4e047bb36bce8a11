"""Per-input-channel scale migration, shared by SmoothQuant (int8-static) and AWQ (int4 weight-only).

``x @ W == (x / s) @ (diag(s) W)`` for any positive ``s`` (one factor per input channel): the
weight rows are multiplied by ``s`` and a ``Mul(x, 1/s)`` is put on the edge into the layers, so
the float model computes the same function while the quantizers see better-conditioned tensors
(SmoothQuant: activation outliers moved into the weights; AWQ: the weight rows that meet large
activations get a finer grid). Layers reading the same activation (an attention block's Q, K and V)
form one group and share one ``s``; the activation's other readers (a residual Add) are untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelpress.plugin_api import (
    Dataset,
    Model,
    WeightedLayer,
    make_session,
    run_dataset,
    with_outputs,
)
from modelpress.plugins.quantize.calibrate import calibration_batch

__all__ = ["ROWS", "ScaleGroup", "apply_scales", "sample_rows", "scale_groups"]

ROWS = 1024  # calibration rows kept per activation for the searches that use them
# Bytes of model inputs one run takes (a batch is run in parts of this size, its rows sampled as one):
# ORT runs many samples at once slower than a few at a time once the model's activations leave the
# caches (PP-OCR rec, 16 samples in one run: twice the CPU time of 4 runs of 4, outputs bit for bit the same).
PART_INPUT_BYTES = 1 << 20


@dataclass
class ScaleGroup:
    """Layers reading one activation ``input``; ``weights`` is their weights as one matrix [K, sum N]."""

    input: str
    layers: list[WeightedLayer]

    def matrix(self) -> np.ndarray:
        """The group's weights in [K, N] orientation, side by side."""
        parts = [_as_kn(layer) for layer in self.layers]
        return (
            np.concatenate(parts, axis=1).astype(np.float32)
            if len(parts) > 1
            else parts[0].astype(np.float32)
        )


def _as_kn(layer: WeightedLayer) -> np.ndarray:
    w = layer.weight_array()
    return w.T if layer.out_axis == 0 else w


def scale_groups(layers: list[WeightedLayer]) -> list[ScaleGroup]:
    """Group 2-D MatMul/Gemm layers of the main graph by the activation they read. A layer whose
    weight other nodes also use (tied weights) cannot be rescaled alone and is left out."""
    groups: dict[str, ScaleGroup] = {}
    for layer in layers:
        x = layer.node.inputs[0]
        w = layer.weight.const_value
        if (
            layer.scope
            or layer.op_type not in ("MatMul", "Gemm")
            or x is None
            or not x.name
            or x.const_value is not None
            or w is None
            or len(w.shape) != 2
            or layer.weight_input != 1
            or len(list(layer.weight.uses())) != 1
        ):
            continue
        attrs = {k: a.value for k, a in layer.node.attributes.items()}
        if attrs.get("transA", 0):
            continue
        groups.setdefault(x.name, ScaleGroup(x.name, [])).layers.append(layer)
    return list(groups.values())


def apply_scales(model: Model, group: ScaleGroup, s: np.ndarray, tag: str) -> None:
    """Multiply the group's weight rows by ``s`` and divide the activation by ``s`` on its way into
    the group's layers (one ``Mul`` node named ``<input>_<tag>``): the function is unchanged."""
    s = np.asarray(s, np.float32)
    for layer in group.layers:
        w = layer.weight_array().astype(np.float32)
        shape = [1] * w.ndim
        shape[layer.in_axis] = -1
        assert layer.weight.name is not None
        model.replace_initializer(layer.weight.name, (w * s.reshape(shape)).astype(np.float32))
    x = group.layers[0].node.inputs[0]
    assert x is not None
    inverse = model.add_initializer(f"{group.input}_{tag}_scale", (1.0 / s).astype(np.float32))
    scaled = model.insert_after(
        x,
        "Mul",
        [inverse],
        name=f"{group.input}_{tag}",
        consumers=[layer.node for layer in group.layers],
    )
    mul = scaled.producer()
    assert mul is not None
    mul.metadata_props["modelpress.role"] = (
        "activation_scale"  # NOTE: Model.parameter_count leaves its scale out
    )


def sample_rows(
    model: Model, names: list[str], data: Dataset, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Per-channel min and max (over the last axis) of each named activation over ``data``, and a
    sample of about ``ROWS`` of its rows (one ORT session, streamed in batches sized like calibration's,
    so one batch's observed tensors fit its activation budget)."""
    session = make_session(with_outputs(model, names), spin=False)
    batch_size = calibration_batch(session, data, batch_size)
    outputs = [o.name for o in session.get_outputs()]
    lo: dict[str, np.ndarray] = {}
    hi: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(0)
    batches = data.batch_count(batch_size)
    per_batch = -(-ROWS // batches)
    # NOTE: each activation's rows go into one array made on its first batch (no list of parts joined
    # at the end: that held every sampled row twice, ~130 MB on a MiniLM)
    rows: dict[str, np.ndarray] = {}
    filled = dict.fromkeys(names, 0)
    sample_bytes = sum(int(v.nbytes) for v in data.largest_sample().values())
    part = max(1, PART_INPUT_BYTES // max(sample_bytes, 1))
    for feeds in data.batches(batch_size):
        # NOTE: the batch run ``part`` samples at a time, its outputs joined as one run gives them
        results = run_dataset(session, Dataset(feeds, max_batch=data.max_batch).batches(part))
        for name in names:
            x = np.asarray(results[outputs.index(name)], np.float32)
            x = x.reshape(-1, x.shape[-1])
            lo[name] = np.minimum(lo[name], x.min(axis=0)) if name in lo else x.min(axis=0)
            hi[name] = np.maximum(hi[name], x.max(axis=0)) if name in hi else x.max(axis=0)
            take = x[rng.choice(len(x), size=min(per_batch, len(x)), replace=False)]
            if name not in rows:
                rows[name] = np.empty((batches * per_batch, x.shape[-1]), np.float32)
            rows[name][filled[name] : filled[name] + len(take)] = take
            filled[name] += len(take)
        del results
    return lo, hi, {n: r[: filled[n]] for n, r in rows.items()}
