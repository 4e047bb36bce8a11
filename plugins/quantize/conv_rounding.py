"""GPTQ rounding of int8 Conv weights for ``int8-static`` (:mod:`.gptq_int8` through im2col).

A 2-D Conv is a MatMul of its input's patches (``im2col``: one row per output position, ``K = C x kH x kW``
columns) with the weight as ``[K, N]``, so the same error-compensating rounding applies: each patch
column's rounding error is moved onto the columns not yet rounded through ``H = X^T X`` of calibration
patches. The patches come from the float model (one extra sweep, of the graph cut after the Convs it
observes, over the first calibration samples up to :data:`INPUT_BYTES` of inputs, rows sampled at random
output positions). On MTCNN's ONet, where only the first Conv qualifies (:data:`ROWS_PER_WEIGHT`), the box
regression's relative error on held-out crops falls from 0.0849 to 0.0690 (the zoo benchmark's 64; ORT's
``quantize_dynamic`` 0.0765) and worst-output cosine on 256 crops rises from 0.99566 to 0.99629. Patches of
the *quantized* model's inputs (with the float output as the target: the weights absorbing the
activations' rounding) were measured too and did worse held-out, and an empirical bias correction on top
helped 64 crops and hurt 192: neither is done.

Only ``group == 1`` 2-D Convs; depthwise and grouped Convs round to nearest.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from onnx_ir.passes.common import RemoveUnusedNodesPass

from modelpress.plugin_api import (
    Dataset,
    Model,
    WeightedLayer,
    make_session,
    with_outputs,
)
from modelpress.plugin_api import run as run_session
from modelpress.plugins.quantize.affine import QRange
from modelpress.plugins.quantize.calibrate import calibration_batch
from modelpress.plugins.quantize.gptq_int8 import feedback_gram, gptq_codes, one_blas_thread
from modelpress.plugins.quantize.static_plan import weight_scale

__all__ = ["INPUT_BYTES", "ROWS_PER_WEIGHT", "conv_codes", "patch_rows"]

# NOTE: the patches come from the first calibration samples up to this many input bytes: all 16 of ONet's
# 48x48 crops (0.4 MB), 3 of a 320x320 detector's images, so the sweep stays a small share of quantize CPU
INPUT_BYTES = 4 << 20
_MAX_ROWS = 16384  # patch rows per layer (H costs rows x K^2)
# NOTE: a layer is rounded by GPTQ only with this many input patches per weight of an output channel (K) in the
# samples swept: on ONet, with 16 crops, the first Conv (1254 patches per weight) gains most held-out, the second
# (25) less, the third (1.8) loses part of that again; fewer patches fit H to the calibration crops, not the layer
ROWS_PER_WEIGHT = 64


def _eligible(layer: WeightedLayer) -> bool:
    x = layer.node.inputs[0] if layer.node.inputs else None
    return (
        layer.op_type == "Conv"
        and layer.group == 1
        and layer.spatial_rank == 2
        and x is not None
        and x.const_value is None
        and bool(x.name)
    )


def _pads(layer: WeightedLayer, size: tuple[int, int]) -> list[int]:
    """``[top, left, bottom, right]`` for an input of spatial ``size``, ``auto_pad`` resolved."""
    auto = layer.attribute("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("NOTSET", ""):
        return layer.pads
    if auto == "VALID":
        return [0, 0, 0, 0]
    kernel = (layer.weight.shape or ())[2:]
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, layer.strides, layer.dilations, strict=True):
        total = max((-(-n // s) - 1) * s + (int(k) - 1) * d + 1 - n, 0)
        small = total // 2
        begin.append(small if auto == "SAME_UPPER" else total - small)
        end.append(total - begin[-1])
    return begin + end


def patch_rows(
    layer: WeightedLayer, x: np.ndarray, count: int, rng: np.random.Generator
) -> np.ndarray:
    """``count`` (or all, if fewer) im2col rows ``[M, C x kH x kW]`` of 2-D Conv ``layer`` on input ``x``
    ``[N, C, H, W]``, at random output positions; the columns in the weight's ``(C, kH, kW)`` order."""
    kh, kw = (int(k) for k in (layer.weight.shape or ())[2:])
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    top, left, bottom, right = _pads(layer, (x.shape[2], x.shape[3]))
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    oh = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
    ow = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
    total = x.shape[0] * oh * ow
    if oh <= 0 or ow <= 0:
        return np.empty((0, x.shape[1] * kh * kw), np.float32)
    pick = rng.choice(total, size=count, replace=False) if count < total else np.arange(total)
    n, rest = np.divmod(pick, oh * ow)
    r, c = np.divmod(rest, ow)
    rows = np.empty((len(pick), x.shape[1], kh, kw), np.float32)
    for i in range(kh):
        for j in range(kw):
            rows[:, :, i, j] = x[n, :, r * sh + i * dh, c * sw + j * dw]
    return rows.reshape(len(pick), -1)


def _available(layer: WeightedLayer, x: np.ndarray) -> int:
    """Output positions (im2col rows) of 2-D Conv ``layer`` on input ``x`` ``[N, C, H, W]``."""
    kernel = [int(k) for k in (layer.weight.shape or ())[2:]]
    pads = _pads(layer, (x.shape[2], x.shape[3]))
    sizes = [
        (x.shape[2 + a] + pads[a] + pads[2 + a] - (kernel[a] - 1) * layer.dilations[a] - 1)
        // layer.strides[a]
        + 1
        for a in range(2)
    ]
    return x.shape[0] * max(sizes[0], 0) * max(sizes[1], 0)


def _probe(model: Model, names: list[str]) -> tuple[Any, list[str]]:
    """A session computing only the named tensors (the graph cut after them: the sweep runs the part of the
    model before the layers it observes, not the whole model) and its output names."""
    probe = with_outputs(model, names)
    graph = probe.ir.graph
    for value in list(graph.outputs):
        if value.name not in names:
            graph.outputs.remove(value)
    RemoveUnusedNodesPass()(probe.ir)
    session = make_session(probe, spin=False)
    return session, [o.name for o in session.get_outputs()]


def _inputs(layers: list[WeightedLayer]) -> list[str]:
    """The names of the layers' inputs, each once (what a probe of them outputs)."""
    return list({layer.node.inputs[0].name or "" for layer in layers})


def _enough_rows(
    layers: list[WeightedLayer], model: Model, data: Dataset
) -> tuple[list[WeightedLayer], tuple[Any, list[str]]]:
    """The layers whose input patches over ``data`` number at least :data:`ROWS_PER_WEIGHT` x ``K``
    (their sizes from one run of the first sample), and the probe of all ``layers``' inputs that measured them."""
    probe = _probe(model, _inputs(layers))
    session, outputs = probe
    results = run_session(session, next(data.take(1).batches(1)))
    found = []
    for layer in layers:
        x = results[outputs.index(layer.node.inputs[0].name)]
        k = int(np.prod((layer.weight.shape or ())[1:]))
        if x.ndim == 4 and _available(layer, x) * len(data) >= ROWS_PER_WEIGHT * k:
            found.append(layer)
    return found, probe


def _grams(
    model: Model,
    layers: list[WeightedLayer],
    data: Dataset,
    probe: tuple[Any, list[str]] | None = None,
) -> dict:
    """``H = X^T X`` of each layer's input patches (float model, one session, streamed in runs of about 4 MB of
    observed tensors; at most :data:`_MAX_ROWS` random rows per layer), by layer name. ``probe``: a
    session of :func:`_probe` already made for exactly these layers' inputs (not made again)."""
    session, outputs = probe if probe is not None else _probe(model, _inputs(layers))
    # NOTE: a quarter of calibration's 16 MB batch budget of observed tensors a run, as its collector's parts
    step = max(1, calibration_batch(session, data, 64) // 4)
    per_sample = -(-_MAX_ROWS // len(data))
    rng = np.random.default_rng(0)
    grams: dict[str, np.ndarray] = {}
    for feeds in data.batches(step):
        results = run_session(session, feeds)
        for layer in layers:
            x = np.asarray(results[outputs.index(layer.node.inputs[0].name)], np.float32)
            rows = patch_rows(layer, x, per_sample * len(x), rng)
            gram = rows.T @ rows
            grams[layer.name] = grams[layer.name] + gram if layer.name in grams else gram
        del results
    return grams


def conv_codes(
    model: Model,
    layers: list[WeightedLayer],
    data: Dataset,
    grid: QRange,
    *,
    per_channel: bool,
    pairs: bool = False,
) -> dict[str, np.ndarray]:
    """GPTQ int8 codes (the weight's own ``[N, C, kH, kW]`` layout, on the scales :func:`.static_plan.weight_plan`
    gives it; with ``pairs``, those kept from saturating) of each eligible Conv among ``layers``, by layer
    name; the others are left out."""
    eligible = [layer for layer in layers if _eligible(layer)]
    if not eligible or not len(data):
        return {}
    sample = max(sum(int(v.nbytes) for v in data.largest_sample().values()), 1)
    data = data.take(max(1, min(len(data), INPUT_BYTES // sample)))
    found, probe = _enough_rows(eligible, model, data)
    # NOTE: where every layer has rows enough (YOLOv8n, PP-OCR), the probe that counted them is the one the
    # grams need; else its session goes before theirs is made
    reuse = probe if _inputs(found) == _inputs(eligible) else None
    eligible = found
    del probe
    codes: dict[str, np.ndarray] = {}
    with one_blas_thread():
        grams = _grams(model, eligible, data, reuse) if eligible else {}
        reuse = None
        for layer in eligible:
            gram = grams.pop(layer.name, None)
            fb = feedback_gram(gram) if gram is not None else None
            if fb is None:
                continue
            w = layer.weight_array().astype(np.float32)
            scale, _ = weight_scale(layer, w, grid, per_channel, pairs=pairs)
            w_kn = w.reshape(w.shape[0], -1).T
            codes[layer.name] = np.ascontiguousarray(
                gptq_codes(w_kn, fb, scale, grid).T.reshape(w.shape)
            )
    return codes
