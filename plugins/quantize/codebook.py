"""``codebook``: non-uniform quantization by k-means weight sharing.

Each large weight is replaced by ``2^bits`` shared values (a float codebook found by k-means) and
a uint8 tensor of indices into it: the "quantization table" idea. The graph rebuilds the
weight with ``Gather(codebook, Cast(indices, int64))``, which ONNX Runtime folds into a constant
when it loads the model, so it runs as fast as before while the file shrinks (~4x for float32).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.errors import OptionsError
from modelpress.methods import Options, PassContext
from modelpress.model import Model

__all__ = ["CodebookOptions", "codebook", "kmeans_1d"]


class CodebookOptions(Options):
    bits: int = Field(4, ge=2, le=8, description="codebook size 2^bits (2..8)")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul", "ConvTranspose"], description="layers whose weights are shared")
    min_elements: int = Field(256, ge=1, description="skip weights smaller than this")
    iterations: int = Field(30, ge=1, description="k-means (Lloyd) iterations")
    exclude: list[str] = Field(default_factory=list, description="node names to leave alone")


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """1-D k-means (Lloyd) with quantile initialisation: returns (codebook[k], indices)."""
    flat = values.astype(np.float64).ravel()
    unique = np.unique(flat)
    if len(unique) <= k:
        codebook = np.pad(unique, (0, k - len(unique)), constant_values=unique[-1] if len(unique) else 0.0)
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


def codebook(model: Model, opts: CodebookOptions, ctx: PassContext) -> None:
    k = 2**opts.bits
    graph = model.ir.graph
    done, before, after, sq_error, count = 0, 0, 0, 0.0, 0
    seen: set[str] = set()
    refused: dict[str, str] = {}
    for layer in model.weighted_layers(frozenset(opts.op_types), subgraphs=True):
        weight = layer.weight
        tensor = weight.const_value
        if layer.name in opts.exclude or weight.name in seen or tensor is None or tensor.dtype != ir.DataType.FLOAT or tensor.size < opts.min_elements:
            continue
        if weight.graph is not graph:
            refused[layer.name] = f"its weight is an initializer of a subgraph ({layer.scope}); load with normalize=True to lift it"
            continue
        seen.add(weight.name or "")
        w = tensor.numpy()
        table, idx = kmeans_1d(w, k, opts.iterations)
        sq_error += float(np.sum((table[idx].reshape(w.shape) - w) ** 2))
        count += w.size
        base = weight.name or layer.name
        table_v = model.add_initializer(f"{base}_codebook", table)
        idx_v = model.add_initializer(f"{base}_indices", idx.reshape(w.shape))
        as_int = model.new_node("Cast", [idx_v], {"to": ir.DataType.INT64}, name=f"{base}_indices_Cast",
                                outputs=[(f"{base}_indices_int64", ir.DataType.INT64)])
        gather = model.new_node("Gather", [table_v, as_int.outputs[0]], {"axis": 0}, name=f"{base}_Gather",
                                outputs=[(f"{base}_decoded", ir.DataType.FLOAT)])
        gather.outputs[0].shape = ir.Shape(w.shape)
        graph.insert_before(graph[0], [as_int, gather])
        weight.replace_all_uses_with(gather.outputs[0])
        gather.outputs[0].name, weight.name = base, f"{base}_float_unused"
        (weight.graph or graph).initializers.pop(weight.name)
        before += w.nbytes
        after += idx.nbytes + table.nbytes
        done += 1
    if not done:
        raise OptionsError(f"codebook: no {', '.join(opts.op_types)} weight with >= {opts.min_elements} float elements in {model.name!r}{f' ({refused})' if refused else ''}")
    ctx.figures.update({
        "layers": done, "bits": opts.bits, "weight_bytes_before": before, "weight_bytes_after": after,
        "weight_compression": round(before / max(after, 1), 3), "rms_weight_error": round(float(np.sqrt(sq_error / max(count, 1))), 6),
        **({"skipped": refused} if refused else {}),
    })
