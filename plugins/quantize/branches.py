"""``int8-static`` inside If branches: the branch every calibration sample takes is inlined for the pass, the
other gets int8 weights with float compute, and the quantized nodes go back into the branch.

silero-vad keeps its whole network inside the two branches of an ``If`` on the sample rate; a pass that only
sees the main graph finds nothing to quantize. :func:`flatten` evaluates each such ``If``'s condition on the
calibration data; where every sample gives the same value, the taken branch's nodes are moved into the main
graph (its outputs through exit Identity nodes), so calibration observes its intermediates and the rest of
int8-static (selection, SmoothQuant, QDQ, the sensitivity search) works on it as on any graph. The branch no
sample takes cannot be calibrated: its weighted layers get int8 weights behind a DequantizeLinear in the
branch (as ``int8-weight-only`` does), float compute. :meth:`Flat.restore` then moves the quantized region (the
exits' ancestors that were not main-graph nodes, with their Q/DQ and the initializers only they read) back into
a new ``If`` with the untouched other branch. Where the feeds differ (both sample rates given), the branch most
of them take is calibrated on those feeds and the other gets int8 weights. Loop/Scan bodies stay float, with
their reason in ``float_nodes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from modelpress.plugin_api import (
    Dataset,
    Model,
    Out,
    UnsupportedModelError,
    WeightedLayer,
    make_session,
    with_outputs,
)
from modelpress.plugin_api import run as run_session
from modelpress.plugins.quantize.affine import per_axis, quantize
from modelpress.plugins.quantize.static_plan import weight_grid, weight_scale

__all__ = ["Flat", "flatten"]

_BRANCHES = ("then_branch", "else_branch")
_FEED_BATCH = 64  # NOTE: a condition is one value per feed: feeds of at most this many samples


@dataclass
class _Inlined:
    """One If whose ``taken`` branch was inlined: its node (detached, holding the other branch), the exit
    Identity node names (their outputs stand for the If's outputs), and the condition's value name."""

    node: ir.Node
    taken: str
    exits: list[str]
    cond: str
    feeds: int = 0  # NOTE: of the calibration feeds that reached the If, those taking ``taken``
    total: int = 0
    # NOTE: the main graph's node names before the inlining: where the region going back stops
    outside: set[str] = field(default_factory=set)
    weight_only: list[str] = field(default_factory=list)
    weight_only_bytes: int = 0  # NOTE: the float bytes of the weights made int8 in the other branch


@dataclass
class Flat:
    """The observation model (taken branches inlined), the calibration feeds it is calibrated on, what was inlined."""

    model: Model
    data: Dataset  # NOTE: the calibration feeds that take every inlined branch
    inlined: list[_Inlined] = field(default_factory=list)
    source_bytes: int = 0  # NOTE: every initializer of the model as given, in any graph

    def low_bit_share(self, share: float) -> float:
        """int8-static's ``low_bit_weight_share`` (of :attr:`model`'s main-graph weights) over the whole model:
        the other branches' weights made int8 count as low-bit, their float weights (LSTMs) as not."""
        main = sum(_bytes(v) for v in self.model.ir.graph.initializers.values())
        low = share * main + sum(rec.weight_only_bytes for rec in self.inlined)
        return round(low / max(self.source_bytes, 1), 4)

    def restore(self, quantized: Model) -> Model:
        """``quantized`` (a pass's result on :attr:`model`) with each inlined region back in its If."""
        for rec in reversed(self.inlined):
            _rewrap(quantized, rec, {e for r in self.inlined for e in r.exits})
        return quantized

    def weight_only_nodes(self) -> dict[str, str]:
        """The other branches' layers, each with what was done (int8-static's ``weight_only_nodes``)."""
        return {
            name: f"in If {rec.node.name!r} {_BRANCHES[1 - _BRANCHES.index(rec.taken)]}, which the calibration "
            "feeds did not take: int8 weights, float activations"
            for rec in self.inlined
            for name in rec.weight_only
        }

    def figures(self) -> dict[str, str]:
        out = {}
        for rec in self.inlined:
            other = _BRANCHES[1 - _BRANCHES.index(rec.taken)]
            # NOTE: no colon: the report groups a figure's names by the text before one
            rest = rec.total - rec.feeds
            out[rec.node.name or "If"] = (
                f"{rec.taken} taken by {rec.feeds} of {rec.total} calibration feeds, quantized statically"
                f"{' on those' if rest else ''}; {other} by {rest or 'none'}, its {len(rec.weight_only)} weighted "
                "layer(s) int8 weight-only (float compute)"
            )
        return out


def _condition_name(node: ir.Node) -> str:
    cond = node.inputs[0]
    return (cond.name if cond is not None else None) or ""


def _branch_layers(model: Model, node: ir.Node, op_types: frozenset[str]) -> list[WeightedLayer]:
    return [
        layer
        for layer in model.weighted_layers(op_types, subgraphs=True)
        if layer.scope.startswith(f"If {node.name!r} ")
    ]


def _conditions(model: Model, ifs: list[ir.Node], data: Dataset) -> dict[str, list[bool]]:
    """Each If's condition on every feed of ``data`` (one ORT session with the conditions as outputs)."""
    names = [_condition_name(node) for node in ifs]
    probe = with_outputs(model, names)
    # NOTE: only what the conditions need (silero-vad's: an Equal on the sample rate), not the whole model
    graph = probe.ir.graph
    kept = [v for v in graph.outputs if v.name in names]
    graph.outputs.clear()
    graph.outputs.extend(kept)
    RemoveUnusedNodesPass()(probe.ir)
    read = {id(v) for g in _graphs_under(graph) for n in g for v in n.inputs}
    for name, value in list(graph.initializers.items()):
        if id(value) not in read:
            graph.initializers.pop(name)
    session = make_session(probe, spin=False)  # NOTE: a few runs: no busy-waiting threads
    wanted = [o.name for o in session.get_outputs()]
    seen: dict[str, list[bool]] = {name: [] for name in names}
    for feeds in data.batches(_FEED_BATCH):
        outs = dict(zip(wanted, run_session(session, feeds), strict=True))
        for name in names:
            seen[name].append(bool(np.asarray(outs[name]).reshape(-1)[0]))
    return seen


def flatten(model: Model, data: Dataset, op_types: frozenset[str]) -> Flat | None:
    """The observation model of ``model`` (a clone), or None when no If branch holds weighted layers."""
    flat = Flat(model.clone(), data)
    flat.source_bytes = sum(
        _bytes(v) for g in _graphs_under(model.ir.graph) for v in g.initializers.values()
    )
    for _ in range(8):  # NOTE: nested Ifs surface in the main graph once their parent is inlined
        graph = flat.model.ir.graph
        ifs = [n for n in graph if n.op_type == "If" and _branch_layers(flat.model, n, op_types)]
        if not ifs:
            break
        seen = _conditions(flat.model, ifs, flat.data)
        for node in ifs:
            values = seen[_condition_name(node)]
            # NOTE: feeds on both sides (both sample rates): the branch most take is calibrated on them
            cond = values.count(True) >= values.count(False)
            rec = _inline(flat.model, node, cond, op_types)
            rec.feeds, rec.total = values.count(cond), len(values)
            flat.inlined.append(rec)
            if rec.feeds < rec.total:
                flat.data = flat.data.select_feeds([v == cond for v in values], _FEED_BATCH)
                break  # NOTE: the other Ifs' conditions are taken again on the feeds kept
    return flat if flat.inlined else None


def _inline(model: Model, node: ir.Node, cond: bool, op_types: frozenset[str]) -> _Inlined:
    """Move ``node``'s taken branch into the main graph before it; detach ``node`` (keeping the other branch)."""
    graph = model.ir.graph
    taken = _BRANCHES[0 if cond else 1]
    other = node.attributes[_BRANCHES[1 - _BRANCHES.index(taken)]].as_graph()
    rec = _Inlined(node, taken, [], _condition_name(node))
    rec.outside = {n.name for n in graph if n is not node}
    rec.weight_only, rec.weight_only_bytes = _weight_only(model, node, other, op_types)
    _own_initializers(graph, other)
    branch = node.attributes[taken].as_graph()
    for name in list(branch.initializers):
        value = branch.initializers.pop(name)
        value.name = model.fresh_name(name)
        graph.register_initializer(value)
    nodes = list(branch)
    branch.remove(nodes)
    graph.insert_before(node, nodes)
    b = model.builder(prefix=f"{node.name}/exit")
    for out, inner in zip(node.outputs, list(branch.outputs), strict=True):
        exit_value = b.op("Identity", [inner], out=Out(dtype=out.dtype, shape=out.shape))
        _take_over(model, out, exit_value)
        rec.exits.append(exit_value.producer().name)  # type: ignore[union-attr]
    b.insert(before=node)
    branch.outputs.clear()
    graph.remove(node)
    return rec


def _bytes(value: ir.Value) -> int:
    return int(value.const_value.nbytes) if value.const_value is not None else 0


def _weight_only(
    model: Model, node: ir.Node, other: ir.Graph, op_types: frozenset[str]
) -> tuple[list[str], int]:
    """Int8 weights behind a DequantizeLinear, in the graph of each weighted layer of the branch ``other``:
    the layers done and the float bytes their weights had."""
    done, nbytes = [], 0
    for layer in _branch_layers(model, node, op_types):
        where = layer.node.graph
        if where is None or not _within(where, other):
            continue
        w = layer.weight_array().astype(np.float32)
        nbytes += _bytes(layer.weight)
        grid = weight_grid(False)
        scale, zero = weight_scale(layer, w, grid, True)
        codes = quantize(
            w, per_axis(scale, w.ndim, layer.out_axis), per_axis(zero, w.ndim, layer.out_axis), grid
        )
        b = model.builder(prefix=layer.name, graph=where)
        q = b.initializer(codes.astype(np.int8), f"{layer.weight.name}_int8")
        s = b.initializer(scale.astype(np.float32), f"{layer.weight.name}_scale")
        dq = b.op(
            "DequantizeLinear",
            [q, s],
            {"axis": layer.out_axis},
            out=Out(dtype=ir.DataType.FLOAT, shape=layer.weight.shape),
        )
        b.insert(before=layer.node)
        old = layer.weight
        layer.node.replace_input_with(layer.weight_input, dq)
        if old.is_initializer() and not list(old.uses()) and old.graph is not None:
            old.graph.initializers.pop(old.name or "")
        done.append(layer.name)
    return done, nbytes


def _within(graph: ir.Graph, root: ir.Graph) -> bool:
    return any(g is graph for g in _graphs_under(root))


def _graphs_under(graph: ir.Graph) -> list[ir.Graph]:
    return [graph, *graph.subgraphs()]


def _nodes_under(nodes: list[ir.Node]) -> set[int]:
    """The ids of ``nodes`` and of every node inside their subgraphs, at any depth."""
    ids = {id(node) for node in nodes}
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                ids |= {id(n) for n in attr.as_graph().all_nodes()}
            elif attr.type == ir.AttributeType.GRAPHS:
                ids |= {id(n) for g in attr.as_graphs() for n in g.all_nodes()}
    return ids


def _own_initializers(main: ir.Graph, sub: ir.Graph, nodes: list[ir.Node] | None = None) -> None:
    """Move the main-graph initializers read only by ``nodes`` (default: ``sub``'s, at any depth) into ``sub``:
    ORT fuses a DequantizeLinear with its consumer and prepacks the weight only when both are in one graph."""
    inside = _nodes_under(list(sub) if nodes is None else nodes)
    for name, value in list(main.initializers.items()):
        users = [user for user, _ in value.uses()]
        if users and all(id(u) in inside for u in users) and not value.is_graph_output():
            main.initializers.pop(name)
            sub.register_initializer(value)


def _reads(node: ir.Node) -> list[ir.Value | None]:
    """``node``'s inputs and the outer-scope values its subgraphs read (a nested If's implicit inputs)."""
    found = list(node.inputs)
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found += [v for g in _graphs_under(attr.as_graph()) for n in g for v in n.inputs]
    return found


def _region(
    graph: ir.Graph, exits: list[ir.Node], outside: set[str], stops: set[str]
) -> list[ir.Node]:
    """The nodes that go back into the branch: the exits and their ancestors that were not main-graph nodes
    when it was inlined (``outside``; nor another If's exits), less any whose outputs something outside
    reads; in graph order."""
    region: dict[int, ir.Node] = {id(e): e for e in exits}
    todo = list(exits)
    while todo:
        for value in _reads(todo.pop()):
            producer = value.producer() if value is not None else None
            if (
                producer is None
                or producer.graph is not graph
                or id(producer) in region
                or producer.name in outside
                or producer.name in stops
            ):
                continue
            region[id(producer)] = producer
            todo.append(producer)
    exit_ids = {id(e) for e in exits}
    changed = True
    while changed:
        # NOTE: a read from inside a region node's own subgraphs (a nested If) is a read from the region
        inside, changed = _nodes_under(list(region.values())), False
        for key, node in list(region.items()):
            if key not in exit_ids and any(
                out.is_graph_output() or any(id(u) not in inside for u, _ in out.uses())
                for out in node.outputs
            ):
                del region[key]
                changed = True
    return [node for node in graph if id(node) in region]


def _rewrap(model: Model, rec: _Inlined, all_exits: set[str]) -> None:
    graph = model.ir.graph
    by_name = {node.name: node for node in graph}
    exits = [by_name[name] for name in rec.exits]
    nodes = _region(graph, exits, rec.outside, all_exits - set(rec.exits))
    inside = {id(n) for n in nodes}
    for node in graph:
        if id(node) not in inside and any(
            v is not None and id(v.producer()) in inside and v.producer() not in exits
            for v in node.inputs
        ):
            raise UnsupportedModelError(
                f"int8-static: node {node.name!r} reads a value of If {rec.node.name!r}'s {rec.taken} from "
                "outside it after quantization; quantize with exclude= naming it, or int8-weight-only"
            )
    values = _values(graph)
    cond = values.get(rec.cond)
    if cond is None:
        raise UnsupportedModelError(
            f"int8-static: the condition {rec.cond!r} of If {rec.node.name!r} was lost in quantization"
        )
    other_name = _BRANCHES[1 - _BRANCHES.index(rec.taken)]
    other = rec.node.attributes[other_name].as_graph()
    _relink(other, values)
    outs = [e.outputs[0] for e in exits]
    graph.remove(nodes)
    taken = ir.Graph([], [], nodes=[], name=rec.node.attributes[rec.taken].as_graph().name)
    b = model.builder()
    # NOTE: built with an empty stand-in for the other branch, which then takes its place: the builder's
    # per-node type inference serialises the node whole, the other branch's weights with it
    stand_in = ir.Graph([], [], nodes=[], name=other.name)
    new_outs = b.op_multi_out(
        "If",
        [cond],
        {rec.taken: taken, other_name: stand_in},
        name=rec.node.name,
        outs=[Out(dtype=v.dtype, shape=v.shape) for v in outs],
    )
    if_node = new_outs[0].producer()
    assert if_node is not None
    if_node.attributes[other_name] = ir.Attr(other_name, ir.AttributeType.GRAPH, other)
    readers = _consumer_ids(outs)
    anchor = next((n for n in graph if id(n) in readers), None)
    for out, new in zip(outs, new_outs, strict=True):
        _take_over(model, out, new)
    taken.extend(nodes)
    taken.outputs.extend(outs)
    b.insert(before=anchor) if anchor is not None else b.insert()
    _own_initializers(graph, taken)


def _take_over(model: Model, old: ir.Value, new: ir.Value) -> None:
    """``new`` replaces ``old`` everywhere, graph outputs included, and takes its name (a graph output keeps its name)."""
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    name = old.name
    old.name = model.fresh_name(f"{name}_inner")
    new.name = name


def _consumer_ids(values: list[ir.Value]) -> set[int]:
    return {id(u) for v in values for u, _ in v.uses()}


def _values(graph: ir.Graph) -> dict[str, ir.Value]:
    found: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    found.update({name: v for name, v in graph.initializers.items()})
    for node in graph:
        found.update({o.name: o for o in node.outputs if o.name})
    return found


def _relink(sub: ir.Graph, values: dict[str, ir.Value]) -> None:
    """Point ``sub``'s reads of outer-scope values (of the model it was detached from) at ``values`` by name."""
    local: set[int] = set()
    for g in _graphs_under(sub):
        local |= {id(v) for v in g.inputs} | {id(v) for v in g.initializers.values()}
        local |= {id(o) for n in g for o in n.outputs}
    for g in _graphs_under(sub):
        for node in g:
            for i, v in enumerate(node.inputs):
                if v is not None and id(v) not in local:
                    new = values.get(v.name or "")
                    if new is None:
                        raise UnsupportedModelError(
                            f"int8-static: {v.name!r}, read inside an If branch, was lost in quantization"
                        )
                    node.replace_input_with(i, new)
