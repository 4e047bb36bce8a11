"""Normalisation and activation subgraphs as exporters emit them, found so no QDQ lands inside them.

Exporters decompose LayerNorm (``ReduceMean -> Sub -> Pow -> ReduceMean -> Add -> Sqrt -> Div ->
Mul -> Add``, or TensorFlow's ``mean * rsqrt`` form), RMSNorm, GELU (erf and tanh forms) and
Softmax into element-wise ops. Their intermediate tensors have tiny or huge dynamic ranges
(a variance plus epsilon, a -10000 attention mask): quantizing them to 8 bits collapses the model.
:func:`find_patterns` marks every node of such a subgraph; the quantizer keeps them in float and
quantizes only at their boundary (the input and output, where ORT's integer kernels are).

A region is grown from an anchor (the second-moment reduction, ``Erf``, ``Tanh``, ``Exp``) forward
along element-wise ops until all the paths leaving it have merged into one tensor (and the
pattern's key op has been passed), then extended by its exclusive inputs and a trailing
constant scale/bias.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import onnx_ir as ir

__all__ = ["Pattern", "find_patterns", "mask_adds"]

_ELEMENTWISE = {
    "Add",
    "Sub",
    "Mul",
    "Div",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "Neg",
    "Erf",
    "Tanh",
    "Exp",
    "Cast",
    "ReduceMean",
    "ReduceSum",
    "ReduceMax",
    "Max",
    "Min",
    "Clip",
    "Identity",
}
_MAX_NODES = 24


@dataclass
class Pattern:
    kind: str  # "LayerNorm", "RMSNorm", "GELU", "Softmax"
    nodes: list[ir.Node] = field(default_factory=list)

    @property
    def output(self) -> ir.Value:
        return self.nodes[-1].outputs[0]


def _is_const(value: ir.Value | None) -> bool:
    return (
        value is None
        or value.const_value is not None
        or ((p := value.producer()) is not None and p.op_type == "Constant")
    )


def _squared(node: ir.Node) -> ir.Value | None:
    """The tensor ``node`` squares (``Pow(d, 2)`` or ``Mul(d, d)``), else None."""
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    if node.op_type == "Pow" and len(node.inputs) == 2 and node.inputs[1] is not None:
        exponent = node.inputs[1].const_value
        if (
            exponent is not None
            and exponent.size == 1
            and float(exponent.numpy().ravel()[0]) == 2.0
        ):
            return node.inputs[0]
    return None


def _grow(
    start: list[ir.Node], order: dict[int, int], needs: set[str], limit: int = _MAX_NODES
) -> list[ir.Node] | None:
    """Nodes from ``start`` forward along element-wise ops until one tensor carries every path out,
    having passed an op in ``needs``. None when the paths do not merge within ``limit`` nodes."""
    region: dict[int, ir.Node] = {id(n): n for n in start}
    passed = False  # the key op must come after the start (the start may hold a Mul/Div of its own)
    while len(region) <= limit:
        live = [
            out
            for n in region.values()
            for out in n.outputs
            if any(id(u) not in region for u, _ in out.uses()) or out.is_graph_output()
        ]
        if len(live) == 1 and passed:
            return sorted(region.values(), key=lambda n: order[id(n)])
        pending = [u for out in live for u, _ in out.uses() if id(u) not in region]
        if not pending or any(
            u.op_type not in _ELEMENTWISE or u.domain not in ("", "ai.onnx") for u in pending
        ):
            return None
        nxt = min(pending, key=lambda n: order[id(n)])
        region[id(nxt)] = nxt
        passed = passed or nxt.op_type in needs
    return None


def _sibling(node: ir.Node, members: set[int], depth: int = 3) -> bool:
    """Whether ``node`` computes from the region's own entry tensor (one non-constant input, traced back
    through such ops to a tensor a region node reads) rather than from outside (a MatMul's bias Add)."""
    for _ in range(depth):
        feeds = [v for v in node.inputs if not _is_const(v)]
        if len(feeds) != 1 or feeds[0] is None:
            return False
        if any(id(u) in members for u, _ in feeds[0].uses()):
            return True
        producer = feeds[0].producer()
        if producer is None or producer.op_type not in _ELEMENTWISE:
            return False
        node = producer
    return False


def _extend(nodes: list[ir.Node], order: dict[int, int]) -> list[ir.Node]:
    """Add the region's exclusive inputs (``x * 0.5`` beside a GELU's erf branch, ``x ** 3`` in tanh-GELU)
    and a trailing constant scale/bias (a LayerNorm's gamma and beta)."""
    members = {id(n) for n in nodes}
    for _ in range(3):
        added = False
        for node in list(nodes):
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                if (
                    producer is None
                    or id(producer) in members
                    or producer.op_type not in _ELEMENTWISE
                ):
                    continue
                if (
                    value is not None
                    and all(id(u) in members for u, _ in value.uses())
                    and not value.is_graph_output()
                    and _sibling(producer, members)
                ):
                    nodes.append(producer)
                    members.add(id(producer))
                    added = True
        if not added:
            break
    while True:
        out = max(nodes, key=lambda n: order[id(n)]).outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output():
            break
        user = uses[0][0]
        if user.op_type not in ("Mul", "Add") or not any(
            _is_const(v) for v in user.inputs if v is not out
        ):
            break
        nodes.append(user)
        members.add(id(user))
    return sorted(nodes, key=lambda n: order[id(n)])


def _norm_region(node: ir.Node, order: dict[int, int]) -> tuple[str, list[ir.Node] | None] | None:
    """The LayerNorm or RMSNorm whose variance ``node`` (a ReduceMean) takes; ``None``: not one."""
    square = node.inputs[0].producer() if node.inputs and node.inputs[0] is not None else None
    if square is None:
        return None
    base = _squared(square)
    if base is None:
        return None
    centred = base.producer()
    if (
        centred is not None
        and centred.op_type == "Sub"
        and centred.inputs[1] is not None
        and centred.inputs[1].producer() is not None
        and centred.inputs[1].producer().op_type == "ReduceMean"  # type: ignore[union-attr]
    ):  # type: ignore[union-attr]
        mean = centred.inputs[1].producer()
        assert mean is not None
        return "LayerNorm", _grow([mean], order, {"Sqrt", "Reciprocal"})
    if centred is not None and centred.op_type == "Sub":
        return "LayerNorm", _grow([centred], order, {"Sqrt", "Reciprocal"})
    return "RMSNorm", _grow([square], order, {"Sqrt", "Reciprocal"})


def _gelu_region(node: ir.Node, order: dict[int, int]) -> list[ir.Node] | None:
    """The GELU around ``node`` (its Erf or Tanh)."""
    start = [node]
    # walk back over the scaling (x / sqrt(2); sqrt(2/pi) * (x + 0.044715 x^3)) used only by this branch
    for _ in range(2):
        feed = next((v for v in start[0].inputs if not _is_const(v)), None)
        producer = feed.producer() if feed is not None else None
        if (
            producer is None
            or producer.op_type not in ("Mul", "Div", "Add")
            or len(list(feed.uses())) != 1  # type: ignore[union-attr]
        ):  # type: ignore[union-attr]
            break
        start.insert(0, producer)
        if producer.op_type == "Add" or node.op_type == "Erf":
            break
    return _grow(start, order, {"Mul"})


def find_patterns(graph: ir.Graph) -> list[Pattern]:
    """Every decomposed LayerNorm/RMSNorm/GELU/Softmax in ``graph`` (and Softmax ops), in graph order."""
    order = {id(n): i for i, n in enumerate(graph)}
    taken: set[int] = set()
    found: list[Pattern] = []

    def add(kind: str, nodes: list[ir.Node] | None) -> None:
        if nodes and not any(id(n) in taken for n in nodes):
            nodes = _extend(nodes, order)
            taken.update(id(n) for n in nodes)
            found.append(Pattern(kind, nodes))

    for node in graph:
        if node.domain not in ("", "ai.onnx") or id(node) in taken:
            continue
        if node.op_type == "ReduceMean":
            norm = _norm_region(node, order)
            if norm is not None:
                add(*norm)
        elif node.op_type in ("Erf", "Tanh"):
            add("GELU", _gelu_region(node, order))
        elif node.op_type == "Exp":
            centred = node.inputs[0].producer() if node.inputs[0] is not None else None
            start = [centred, node] if centred is not None and centred.op_type == "Sub" else [node]
            region = _grow(start, order, {"Div"})
            if region and any(n.op_type == "ReduceSum" for n in region):
                add("Softmax", region)
        elif node.op_type in ("Softmax", "LogSoftmax"):
            add("Softmax", [node])
        elif node.op_type == "LayerNormalization":  # NOTE: one op (or fused from its decomposition)
            add("LayerNorm", [node])
    return found


def _from_weights(value: ir.Value, depth: int = 32) -> bool:
    """Whether ``value`` depends on a weighted op (MatMul/Conv/Gemm) within ``depth`` steps back."""
    stack, seen = [(value, 0)], set()
    while stack:
        v, d = stack.pop()
        producer = v.producer()
        if producer is None or id(producer) in seen or d > depth:
            continue
        seen.add(id(producer))
        if producer.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose", "Gather"):
            if producer.op_type != "Gather" or (
                producer.inputs[0] is not None and producer.inputs[0].const_value is not None
            ):
                return True
        stack.extend((i, d + 1) for i in producer.inputs if i is not None)
    return False


def mask_adds(graph: ir.Graph) -> list[ir.Node]:
    """Adds feeding a Softmax (directly or through one op) where one side is computed from the
    graph's inputs alone (an attention mask, often -10000 or -inf where masked)."""
    result = []
    for node in graph:
        if node.op_type != "Add" or len(node.inputs) != 2:
            continue
        users = [u for u, _ in node.outputs[0].uses()]
        near = users + [uu for u in users for uu, _ in u.outputs[0].uses()] if users else []
        if not any(u.op_type in ("Softmax", "Exp", "ReduceMax", "Sub") for u in near):
            continue
        sides = [v for v in node.inputs if v is not None]
        if any(not _is_const(v) and not _from_weights(v) for v in sides):
            result.append(node)
    return result


def summary(patterns: list[Pattern], masks: list[ir.Node]) -> dict[str, int]:
    counts = Counter(p.kind for p in patterns)
    if masks:
        counts["attention mask"] = len(masks)
    return dict(counts)
