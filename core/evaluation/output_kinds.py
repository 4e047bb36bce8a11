"""What each model output *is*, from its graph and its reference values: the first half of
:mod:`modelpress.evaluation.criteria` (which decides how each kind is judged).

Forms (``OutputKind.form``) and the judging family they belong to (``OutputKind.kind``):

* ``labels`` (classifier): an integer output (class ids, counts): compared exactly.
* ``probabilities`` (classifier): produced by Softmax/LogSoftmax/Sigmoid (through
  Reshape/Transpose/Identity/Flatten/Squeeze/Unsqueeze/Cast), or rows of non-negative values
  summing to 1. A Sigmoid's outputs are decisions at 0.5, element by element; a rank >= 3 Sigmoid
  map (a text detector's probability map) is a dense map bounded by [0, 1].
* ``logits`` (classifier): an output named like scores (``logits``, ``class``, ``score``...), the
  input of a Softmax whose result is also an output, or a linear head (Gemm, MatMul, MatMul+Add,
  Conv) whose ``[N, C]`` rows have class structure: one value stands out (the median gap between
  the two largest values, over the row's spread, is at least 1.5x what C random values give) or
  C is 2 (binary logits) with no probability output beside it.
* ``regression``: ``[N]``/``[N, 1]`` values; outputs named like boxes, landmarks, keypoints,
  offsets; a narrow (C < 32) linear head with no normaliser beside a probability output (a
  detector's box and landmark heads: being beside it decides, whatever its arg-max looks like); a
  linear head with no class structure (near-ties, as a 32-value regression has; an arg-max that
  never moves, C < 32); a narrow (C < 32) output of a non-linear op.
* ``embedding``: pooled or normalised vectors (ReduceMean, GlobalAveragePool, LpNormalization...
  at the end), outputs named like embeddings or hidden states, ``[N, T, D]`` token vectors so
  named, a wide (C >= 32) output of a non-linear op (a hidden state), a wide head whose arg-max
  never moves, and a wide (C >= 256) head judged on fewer than 16 rows (too few to see classes).
* ``dense``: rank >= 3 maps (segmentation and detection maps, feature maps, states).

Every decision can be overridden per output (``criteria={"boxes": "regression"}``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

    from modelpress.ir.model import Model

__all__ = ["FORMS", "OutputKind", "classify", "decisiveness"]

# form -> the judging family (the metric follows the family, see criteria.KIND_METRIC)
FORMS = {
    "labels": "classifier",
    "probabilities": "classifier",
    "logits": "classifier",
    "regression": "regression",
    "embedding": "embedding",
    "dense": "dense",
}
PASS_THROUGH = {
    "Identity",
    "Reshape",
    "Transpose",
    "Flatten",
    "Squeeze",
    "Unsqueeze",
    "Cast",
    "Dropout",
}
NORMALISERS = {
    "Softmax": 1.0,
    "LogSoftmax": None,
    "Sigmoid": 1.0,
}  # op -> range of its values (None: unbounded)
_BOUNDED = {"Tanh": 2.0, "HardSigmoid": 1.0}
_POOL_OPS = {
    "ReduceMean",
    "ReduceSum",
    "LpNormalization",
    "ReduceL2",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "ReduceMax",
}
_HEAD_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose"}
_EMBED_NAME = re.compile(r"emb|pool|sentence|feature|hidden|vector|encod", re.I)
_CLASS_NAME = re.compile(r"logit|prob|class|cls|label|score|conf", re.I)
_REGRESSION_NAME = re.compile(
    r"box|bbox|landmark|keypoint|kpt|offset|coord|delta|regress|_reg\b|^reg|loc\b|point|pts|pose|depth|angle",
    re.I,
)
MIN_ROWS = 16  # rows needed before values may decide (class structure, a constant arg-max)
WIDE = 32  # a non-linear output this wide is a hidden vector, narrower a regression
WIDE_HEAD = 256  # a head this wide, seen on too few rows to show classes: judged as an embedding
DECISIVE = 1.5  # class structure: the winner's gap at least this many times random values'


@dataclass(frozen=True)
class OutputKind:
    """What one output is: its ``form``, the judging family ``kind``, why, the class ``axis``
    (``None``: decisions at 0.5 element by element) and the known range of its values (0: unknown)."""

    form: str
    reason: str
    axis: int | None = -1
    value_range: float = 0.0

    @property
    def kind(self) -> str:
        return FORMS[self.form]


@dataclass(frozen=True)
class _Graph:
    """The output's producer seen through pass-through ops, and the ops just before it."""

    op: str | None
    node: ir.Node | None
    pooled: str | None
    linear_head: bool
    feeds_normaliser: bool
    sibling_probabilities: str | None


def _source(value: ir.Value | None) -> ir.Node | None:
    """The node producing ``value``, through pass-through ops."""
    node = value.producer() if value is not None else None
    while (
        node is not None
        and node.op_type in PASS_THROUGH
        and node.inputs
        and node.inputs[0] is not None
    ):
        node = node.inputs[0].producer()
    return node


def _pooled(value: ir.Value | None, depth: int = 4) -> str | None:
    """A pooling/normalising op among the last few producing ``value``, not behind a dense head
    (which makes scores out of pooled features)."""
    node = value.producer() if value is not None else None
    for _ in range(depth):
        if node is None or node.op_type in _HEAD_OPS:
            return None
        if node.op_type in _POOL_OPS:
            return node.op_type
        node = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    return None


def _is_linear_head(node: ir.Node | None) -> bool:
    if node is None:
        return False
    if node.op_type in _HEAD_OPS:
        return True
    if (
        node.op_type == "Add" and len(node.inputs) == 2
    ):  # MatMul + bias, as exporters write a Linear
        ins = [v for v in node.inputs if v is not None]
        const = [
            v
            for v in ins
            if v.const_value is not None
            or ((p := v.producer()) is not None and p.op_type == "Constant")
        ]
        rest = [_source(v) for v in ins if v not in const]
        return (
            len(const) == 1
            and len(rest) == 1
            and rest[0] is not None
            and rest[0].op_type in _HEAD_OPS
        )
    return False


def _graph(model: Model | None, name: str) -> _Graph:
    if model is None:
        return _Graph(None, None, None, False, False, None)
    outputs = {v.name: v for v in model.graph.outputs}
    value = outputs.get(name)
    node = _source(value)
    feeds = False
    if value is not None:
        for user in value.uses():
            consumer = user[0]
            if consumer.op_type in NORMALISERS and any(
                o.is_graph_output() for o in consumer.outputs
            ):
                feeds = True
    sibling = None
    for other, v in outputs.items():
        src = _source(v)
        if (
            other != name
            and src is not None
            and src.op_type in NORMALISERS
            and (value is None or value not in src.inputs)
        ):
            sibling = other
            break
    return _Graph(
        node.op_type if node else None, node, _pooled(value), _is_linear_head(node), feeds, sibling
    )


@functools.lru_cache(maxsize=64)
def _random_decisiveness(classes: int) -> float:
    """The decisiveness of ``classes`` independent normal values (the no-class-structure baseline)."""
    rows = np.random.default_rng(0).standard_normal(
        (max(64, min(512, 4_000_000 // classes)), classes)
    )
    return decisiveness(rows)


def decisiveness(rows: np.ndarray) -> float:
    """Median over rows of the gap between the two largest values over the row's standard deviation."""
    top = np.partition(rows, -2, axis=1)[:, -2:]
    spread = np.maximum(rows.std(axis=1), 1e-30)
    return float(np.median((top[:, 1] - top[:, 0]) / spread))


def _is_row_stochastic(ref: np.ndarray) -> bool:
    return bool(ref.size and np.all(ref >= 0) and np.allclose(ref.sum(axis=-1), 1.0, atol=1e-3))


def _normalised(g: _Graph, ref: np.ndarray) -> OutputKind | None:
    """Probabilities (or a bounded map) from a Softmax/LogSoftmax/Sigmoid producer."""
    if g.op not in NORMALISERS or g.node is None:
        return None
    bound = NORMALISERS[g.op] or 0.0
    if g.op == "Sigmoid":
        if ref.ndim >= 3:
            return OutputKind(
                "dense",
                "Sigmoid map: error against its [0, 1] range and the reference's spread",
                -1,
                bound,
            )
        return OutputKind(
            "probabilities", "produced by Sigmoid: decisions at 0.5, value by value", None, bound
        )
    attr = g.node.attributes.get("axis")
    axis = int(attr.as_int()) if attr is not None else -1
    if (
        g.node.outputs[0].shape is not None
        and axis >= 0
        and len(g.node.outputs[0].shape) != ref.ndim
    ):
        axis = (
            -1
        )  # NOTE: a Reshape after the Softmax moved its axis: the last one is the best guess
    return OutputKind("probabilities", f"produced by {g.op}", axis, bound)


def _rank2(name: str, ref: np.ndarray, g: _Graph) -> OutputKind:
    """``[N, C]`` outputs (C > 1) not produced by a normaliser."""
    rows, width = ref.shape
    pooled = g.pooled
    if pooled or _EMBED_NAME.search(name):
        return OutputKind(
            "embedding", f"pooled/normalised vector ({pooled or 'name ' + repr(name)})"
        )
    if _is_row_stochastic(ref):
        return OutputKind("probabilities", "rows of non-negative values summing to 1", -1, 1.0)
    if _REGRESSION_NAME.search(name):
        return OutputKind("regression", f"named like a regression ({name!r})")
    if _CLASS_NAME.search(name) or g.feeds_normaliser:
        return OutputKind(
            "logits",
            f"named like scores ({name!r})"
            if _CLASS_NAME.search(name)
            else "feeds a Softmax that is also an output",
            1,
        )
    if g.op is not None and not g.linear_head:
        if width >= WIDE:
            return OutputKind(
                "embedding", f"{width}-wide output of {g.op}, no classifier head (a hidden vector)"
            )
        return OutputKind("regression", f"{width} values from {g.op}, no classifier head")
    return _by_values(ref, g, rows, width)


def _by_values(ref: np.ndarray, g: _Graph, rows: int, width: int) -> OutputKind:
    head = f"a {g.op} head" if g.op else f"[N, {width}] values"
    if rows < MIN_ROWS:
        if g.sibling_probabilities:
            return OutputKind(
                "regression", f"{head} beside the probability output {g.sibling_probabilities!r}"
            )
        if width >= WIDE_HEAD:
            return OutputKind(
                "embedding", f"{width}-wide {head} on {rows} rows (too few to see classes)"
            )
        return OutputKind("logits", f"{head} with {width} scores", 1)
    if g.sibling_probabilities and width < WIDE and g.linear_head:
        # NOTE: a detector's box (4) and landmark (10) heads: their arg-max can look decisive (ONet's box
        # deltas are 1.5x random), but a narrow linear head with no normaliser beside a probability output
        # is the regression half of the detector, as on fewer rows
        return OutputKind(
            "regression",
            f"{head} beside the probability output {g.sibling_probabilities!r}: {width} values, no normaliser",
        )
    if len(np.unique(np.argmax(ref, axis=1))) == 1:
        form = "embedding" if width >= WIDE else "regression"
        return OutputKind(
            form, f"{head}: {width} values whose arg-max never changes (no class structure)"
        )
    if width == 2 and not g.sibling_probabilities:
        return OutputKind("logits", f"{head} with 2 scores (binary logits)", 1)
    ratio = decisiveness(ref.astype(np.float64)) / _random_decisiveness(width)
    if ratio >= DECISIVE:
        return OutputKind(
            "logits", f"{head}: one of {width} values stands out ({ratio:.1f}x random)", 1
        )
    beside = (
        f" beside the probability output {g.sibling_probabilities!r}"
        if g.sibling_probabilities
        else ""
    )
    return OutputKind(
        "regression",
        f"{head}{beside}: no class structure in its {width} values ({ratio:.1f}x random)",
    )


def classify(name: str, ref: np.ndarray, model: Model | None = None) -> OutputKind:
    """What output ``name`` is, from ``model``'s graph (when given) and its reference values ``ref``."""
    g = _graph(model, name)
    if not np.issubdtype(ref.dtype, np.floating):
        return OutputKind("labels", "integer output: compared exactly")
    found = _normalised(g, ref)
    if found is not None:
        return found
    if ref.ndim <= 1 or (ref.ndim == 2 and ref.shape[-1] == 1):
        return OutputKind("regression", f"shape {list(ref.shape)}: one value per sample")
    if ref.ndim == 2:
        return _rank2(name, ref, g)
    bound = _BOUNDED.get(g.op or "", 0.0)
    if ref.ndim == 3 and (g.pooled or _EMBED_NAME.search(name)):
        return OutputKind("embedding", "token vectors")
    return OutputKind("dense", f"rank-{ref.ndim} map", -1, bound)
