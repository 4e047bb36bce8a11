"""``codebook``: non-uniform quantization by k-means weight sharing.

Each large weight is replaced by ``2^bits`` shared values (a float codebook found by k-means) and
a uint8 tensor of indices into it: the "quantization table" idea. The graph rebuilds the
weight with ``Gather(codebook, Cast(indices, int64))``, which ONNX Runtime folds into a constant
when it loads the model, so it runs as fast as before while the file shrinks (~4x for float32).

``fine_tune_epochs`` then trains the shared values themselves (Deep Compression's centroid
fine-tuning): the model is lowered to torch with every codebook a parameter and every index
fixed, so the gradient of one shared value is the sum of the gradients of all the weights that
use it; only the codebooks train, the entry kept at zero stays zero, and the epoch with the lowest
held-out loss (labels) is kept.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import DataError, Model, Options, OptionsError, Out, PassContext

__all__ = ["CodebookOptions", "codebook", "kmeans_1d"]


class CodebookOptions(Options):
    bits: int = Field(4, ge=2, le=8, description="codebook size 2^bits (2..8)")
    op_types: list[str] = Field(
        default_factory=lambda: ["Conv", "Gemm", "MatMul", "ConvTranspose"],
        description="layers whose weights are shared",
    )
    min_elements: int = Field(256, ge=1, description="skip weights smaller than this")
    iterations: int = Field(30, ge=1, description="k-means (Lloyd) iterations")
    exclude: list[str] = Field(default_factory=list, description="node names to leave alone")
    keep_zeros: bool = Field(
        False,
        description="pruned weights stay exactly 0 (codebook entry 0); k-means shares the nonzero ones (Deep Compression)",
    )
    biases: bool = Field(
        False,
        description="also share the values of the layers' biases (with >= 4 * 2^bits elements), as Deep Compression does",
    )
    fine_tune_epochs: int = Field(
        0,
        ge=0,
        description="epochs of centroid fine-tuning: train the shared values (gradients summed per cluster) on data=... (Deep Compression)",
    )
    lr: float = Field(1e-3, gt=0, description="learning rate of centroid fine-tuning (Adam)")
    batch_size: int = Field(64, ge=1, description="batch size of centroid fine-tuning")


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) with quantile initialisation: returns (codebook[k], indices)."""
    flat = values.astype(np.float64).ravel()
    unique = np.unique(flat)
    if len(unique) <= k:
        codebook = np.pad(
            unique, (0, k - len(unique)), constant_values=unique[-1] if len(unique) else 0.0
        )
        return codebook.astype(np.float32), np.searchsorted(unique, flat).astype(np.uint8)
    centroids = np.quantile(flat, (np.arange(k) + 0.5) / k)
    order = np.sort(flat)
    for _ in range(iterations):
        edges = (centroids[1:] + centroids[:-1]) / 2
        bins = np.searchsorted(edges, order)
        sums = np.bincount(bins, weights=order, minlength=k)
        counts = np.bincount(bins, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated.sort()
        if np.allclose(updated, centroids):
            break
        centroids = updated
    edges = (centroids[1:] + centroids[:-1]) / 2
    return centroids.astype(np.float32), np.searchsorted(edges, flat).astype(np.uint8)


def _share(w: np.ndarray, k: int, opts: CodebookOptions) -> tuple[np.ndarray, np.ndarray]:
    """(codebook, indices) of ``w``; with ``keep_zeros`` entry 0 is exactly 0 and only nonzero
    weights are clustered (into the other k-1 entries), so pruning survives quantization."""
    if not opts.keep_zeros:
        return kmeans_1d(w, k, opts.iterations)
    flat = w.ravel()
    nonzero = flat != 0
    idx = np.zeros(flat.size, np.uint8)
    table = np.zeros(k, np.float32)
    if nonzero.any():
        sub_table, sub_idx = kmeans_1d(flat[nonzero], k - 1, opts.iterations)
        table[1:] = sub_table
        idx[nonzero] = sub_idx + 1
    return table, idx


def _gather_from(model: Model, weight: ir.Value, table: np.ndarray, idx: np.ndarray) -> str:
    """Replace initializer ``weight`` by ``Gather(table, Cast(idx, int64))`` under the same name;
    returns the table's initializer name."""
    graph = model.ir.graph
    base = weight.name or "weight"
    table_v = model.add_initializer(f"{base}_codebook", table)
    idx_v = model.add_initializer(f"{base}_indices", idx)
    b = model.builder()
    as_int = b.op(
        "Cast",
        [idx_v],
        {"to": ir.DataType.INT64},
        name=f"{base}_indices_Cast",
        out=Out(f"{base}_indices_int64", ir.DataType.INT64),
    )
    decoded = b.op(
        "Gather",
        [table_v, as_int],
        {"axis": 0},
        name=f"{base}_Gather",
        out=Out(f"{base}_decoded", ir.DataType.FLOAT),
    )
    decoded.shape = ir.Shape(idx.shape)
    graph.insert_before(graph[0], list(b.nodes))
    weight.replace_all_uses_with(decoded)
    decoded.name, weight.name = base, f"{base}_float_unused"
    (weight.graph or graph).initializers.pop(weight.name)
    return table_v.name or ""


def codebook(model: Model, opts: CodebookOptions, ctx: PassContext) -> None:
    k = 2**opts.bits
    graph = model.ir.graph
    done, before, after, sq_error, count = 0, 0, 0, 0.0, 0
    seen: set[str] = set()
    refused: dict[str, str] = {}
    tables: dict[str, bool] = {}  # codebook initializer -> its entry 0 is a kept zero
    for layer in model.weighted_layers(frozenset(opts.op_types), subgraphs=True):
        weight = layer.weight
        tensor = weight.const_value
        if (
            layer.name in opts.exclude
            or weight.name in seen
            or tensor is None
            or tensor.dtype != ir.DataType.FLOAT
            or tensor.size < opts.min_elements
        ):
            continue
        if weight.graph is not graph:
            refused[layer.name] = (
                f"its weight is an initializer of a subgraph ({layer.scope}); load with normalize=True to lift it"
            )
            continue
        seen.add(weight.name or "")
        w = tensor.numpy()
        table, idx = _share(w, k, opts)
        sq_error += float(np.sum((table[idx].reshape(w.shape) - w) ** 2))
        count += w.size
        tables[_gather_from(model, weight, table, idx.reshape(w.shape))] = opts.keep_zeros
        if opts.biases and layer.bias is not None and layer.bias.name not in seen:
            bias = layer.bias_array()
            if bias is not None and bias.dtype == np.float32 and bias.size >= 4 * k:
                seen.add(layer.bias.name or "")
                b_table, b_idx = kmeans_1d(bias, k, opts.iterations)
                tables[_gather_from(model, layer.bias, b_table, b_idx.reshape(bias.shape))] = False
        before += w.nbytes
        after += idx.nbytes + table.nbytes
        done += 1
    if not done:
        raise OptionsError(
            f"codebook: no {', '.join(opts.op_types)} weight with >= {opts.min_elements} float elements in {model.name!r}{f' ({refused})' if refused else ''}"
        )
    tuned = _fine_tune_centroids(model, tables, opts, ctx) if opts.fine_tune_epochs else None
    ctx.figures.update(
        {
            "layers": done,
            "bits": opts.bits,
            "weight_bytes_before": before,
            "weight_bytes_after": after,
            "weight_compression": round(before / max(after, 1), 3),
            "rms_weight_error": round(float(np.sqrt(sq_error / max(count, 1))), 6),
            **({"skipped": refused} if refused else {}),
            **(tuned or {}),
        }
    )


def _fine_tune_centroids(
    model: Model, tables: dict[str, bool], opts: CodebookOptions, ctx: PassContext
) -> dict[str, Any]:
    """Train only the codebooks (see the module docstring) and write them back into ``model``."""
    from modelpress.plugin_api import fit, held_out_scores, load_dataset, to_torch

    data = load_dataset(ctx.train, model.signature, what="training")
    if data.labels is None:
        raise DataError(
            "codebook: centroid fine-tuning needs labelled training data (an array named 'labels' in the training data)"
        )
    module = to_torch(model)
    params = [module.get_parameter(module.attribute_name(name)) for name in tables]
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    masks = {}
    for name, zero in tables.items():
        if zero:
            mask = np.ones(model.ir.graph.initializers[name].const_value.shape[0], np.float32)  # type: ignore[union-attr]
            mask[0] = 0.0
            masks[module.attribute_name(name)] = mask
    inputs = [data.inputs[n] for n in model.signature.input_names]
    n = len(inputs[0])
    held = max(1, n // 10)
    result = fit(
        module,
        [a[held:] for a in inputs],
        {"labels": data.labels[held:]},
        loss="auto",
        epochs=opts.fine_tune_epochs,
        lr=opts.lr,
        batch_size=opts.batch_size,
        metric=lambda m: -held_out_scores(m, [a[:held] for a in inputs], data.labels[:held])[0],
        masks=masks,
        parameters=params,
        show_progress=ctx.show_progress,
    )
    for name, zero in tables.items():
        table = (
            module.get_parameter(module.attribute_name(name))
            .detach()
            .cpu()
            .numpy()
            .astype(np.float32)
        )
        if zero:
            table[0] = 0.0  # NOTE: +0.0, not the -0.0 that masking a negative value gives
        model.ir.graph.initializers[name].const_value = ir.tensor(table, name=name)
    figures: dict[str, Any] = {
        "centroid_fine_tune_epochs": len(result.history),
        "interrupted": result.interrupted,
    }
    if result.best_metric is not None:
        figures["validation_loss"] = round(-float(result.best_metric), 5)
    return figures
