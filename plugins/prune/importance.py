"""Channel importance criteria for structured pruning.

* ``l1`` / ``l2``: norm of each output channel's weights, summed over the space's source layers;
* ``bn-scale``: ``|gamma|`` of the BatchNormalization(s) in the space (network slimming);
* ``taylor``: ``|w * dL/dw|`` per channel, accumulated over training batches through the IR ->
  torch lowering (the first-order Taylor estimate of the loss change when the channel goes);
* ``activation``: mean ``|output|`` of each channel over calibration data, from ORT.

Scores of each source are normalised (divided by their mean) before they are summed, so layers
of different scales weigh alike.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpress.plugin_api import DataError, Dataset, Model
from modelpress.plugins.prune.channels import ChannelSpace

__all__ = ["CRITERIA", "channel_scores"]

CRITERIA = ("l1", "l2", "bn-scale", "taylor", "activation")


def _normalise(x: np.ndarray) -> np.ndarray:
    mean = float(np.mean(x))
    return x / mean if mean > 0 else x


def _per_channel(array: np.ndarray, axis: int, order: int) -> np.ndarray:
    moved = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return (
        np.abs(moved).sum(axis=1)
        if order == 1
        else np.sqrt((moved.astype(np.float64) ** 2).sum(axis=1))
    )


def _taylor(
    model: Model, spaces: list[ChannelSpace], data: Dataset, batch_size: int = 64, batches: int = 8
) -> dict[int, np.ndarray]:
    import torch

    from modelpress.plugin_api import to_torch

    if data.labels is None:
        raise DataError("the taylor criterion needs labelled data (an array named 'labels')")
    module = to_torch(model)
    module.train(False)
    names = model.signature.input_names
    totals: dict[str, torch.Tensor] = {}
    for i, feeds in enumerate(data.batches(batch_size)):
        if i >= batches:
            break
        start = i * batch_size
        labels = torch.from_numpy(np.asarray(data.labels[start : start + batch_size])).long()
        module.zero_grad()
        out = module(*[torch.from_numpy(feeds[n]) for n in names])
        out = out[0] if isinstance(out, tuple) else out
        torch.nn.functional.cross_entropy(out, labels).backward()
        for space in spaces:
            for layer in space.sources:
                param = module.tensor(layer.weight.name or "")
                contribution = (param * param.grad).detach()
                key = layer.weight.name or ""
                totals[key] = totals.get(key, 0) + contribution  # type: ignore[assignment, operator]
    scores = {}
    for index, space in enumerate(spaces):
        score = np.zeros(space.channels)
        for layer in space.sources:
            t = totals[layer.weight.name or ""].numpy()
            score += _normalise(_per_channel(t, layer.out_axis, 1))
        scores[index] = score
    return scores


def _activation(model: Model, spaces: list[ChannelSpace], data: Dataset) -> dict[int, np.ndarray]:
    from modelpress.plugin_api import make_session, with_outputs
    from modelpress.plugin_api import run as run_session

    names = [layer.node.outputs[0].name or "" for space in spaces for layer in space.sources]
    session = make_session(with_outputs(model, names))
    outputs = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    for feeds in data.batches(64):
        results = run_session(session, feeds)
        for space in spaces:
            for layer in space.sources:
                name = layer.node.outputs[0].name or ""
                x = np.abs(np.asarray(results[outputs.index(name)], np.float64))
                axis = 1 if space.axis == 1 else x.ndim - 1
                sums[name] = sums.get(name, 0) + np.moveaxis(x, axis, 0).reshape(
                    x.shape[axis], -1
                ).mean(axis=1)  # type: ignore[assignment, operator]
    return {
        i: sum(_normalise(sums[layer.node.outputs[0].name or ""]) for layer in space.sources)  # type: ignore[misc]
        for i, space in enumerate(spaces)
    }  # type: ignore[misc]


def channel_scores(
    model: Model, spaces: list[ChannelSpace], criterion: str, data: Dataset | None
) -> dict[int, np.ndarray]:
    """One importance score per channel for each space (higher = more important)."""
    if criterion in ("taylor", "activation") and data is None:
        raise DataError(f"the {criterion} criterion needs data (data=... / --data train.npz)")
    if criterion == "taylor":
        return _taylor(model, spaces, data)  # type: ignore[arg-type]
    if criterion == "activation":
        return _activation(model, spaces, data)  # type: ignore[arg-type]
    scores: dict[int, Any] = {}
    for index, space in enumerate(spaces):
        if criterion == "bn-scale" and space.batchnorms:
            score = sum(
                _normalise(np.abs(bn.inputs[1].const_value.numpy())) for bn in space.batchnorms
            )  # type: ignore[union-attr]
        else:
            order = 2 if criterion == "l2" else 1
            score = sum(
                _normalise(_per_channel(layer.weight_array(), layer.out_axis, order))
                for layer in space.sources
            )
        scores[index] = np.asarray(score, np.float64)
    return scores
