"""Structural checks of a graph a pass returned: what ONNX Runtime would refuse (or silently carry)
found before export, so that the error can name the plugin that caused it.

* every node passes the ONNX checker's node check (its op's schema: attributes, input and output
  counts) — one node at a time, so the check costs no copy of the weights, whatever the model's size;
* nodes are in topological order;
* no dangling input: every value a node reads (and every graph output) is produced by a node, or is
  a graph input or an initializer;
* no dead node: every node of the main graph contributes to a graph output.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
import onnx_ir as ir

__all__ = ["dead_nodes", "graph_problems"]


def _node_label(node: ir.Node) -> str:
    return (
        f"{node.op_type} node {node.name!r}"
        if node.name
        else f"{node.op_type} node writing {[v.name for v in node.outputs]}"
    )


def _all_graphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph.all_nodes():
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                yield attr.value
            elif attr.type == ir.AttributeType.GRAPHS:
                yield from attr.value


def _dangling(graph: ir.Graph) -> list[str]:
    """Values read (by a node of any graph, or as a graph output) that nothing provides."""
    provided: set[int] = set()
    for g in _all_graphs(graph):
        provided.update(id(v) for v in g.inputs)
        provided.update(id(v) for v in g.initializers.values())
        provided.update(id(v) for n in g for v in n.outputs)
    problems = []
    for g in _all_graphs(graph):
        for node in g:
            for value in node.inputs:
                if value is not None and id(value) not in provided:
                    problems.append(
                        f"{_node_label(node)} reads {value.name!r}, which no node, initializer or graph input provides (a dangling input)"
                    )
        for value in g.outputs:
            if id(value) not in provided:
                problems.append(
                    f"graph output {value.name!r} is provided by no node, initializer or graph input (a dangling output)"
                )
    return problems


def _unsorted(graph: ir.Graph) -> list[str]:
    """Main-graph nodes that read a value a later node produces."""
    position = {id(node): i for i, node in enumerate(graph)}
    problems = []
    for i, node in enumerate(graph):
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and position.get(id(producer), -1) > i:
                problems.append(
                    f"{_node_label(node)} reads {value.name!r} before {_node_label(producer)} computes it (nodes not in topological order)"  # type: ignore[union-attr]
                )
    return problems


def dead_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Main-graph nodes none of whose outputs reaches a graph output (values read inside a subgraph count)."""
    live: set[int] = set()
    stack = [v for v in graph.outputs]
    while stack:
        producer = stack.pop().producer()
        if producer is None or id(producer) in live:
            continue
        live.add(id(producer))
        stack.extend(v for v in producer.inputs if v is not None)
        for attr in producer.attributes.values():
            subgraphs = (
                [attr.value]
                if attr.type == ir.AttributeType.GRAPH
                else attr.value
                if attr.type == ir.AttributeType.GRAPHS
                else []
            )
            for sub in subgraphs:
                stack.extend(
                    v for g in _all_graphs(sub) for n in g for v in n.inputs if v is not None
                )
                stack.extend(v for g in _all_graphs(sub) for v in g.outputs)
    return [node for node in graph if id(node) not in live]


def _schema_problems(model: ir.Model) -> list[str]:
    """The ONNX checker's verdict on each main-graph node (nodes with subgraphs: their own attributes
    are checked by ORT at load; ops of domains ONNX does not know are skipped, as the checker does)."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = model.ir_version
    context.opset_imports = dict(model.opset_imports)
    lexical = onnx.checker.C.LexicalScopeContext()
    problems = []
    for node in model.graph:
        if any(
            a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for a in node.attributes.values()
        ):
            continue
        try:
            onnx.checker.check_node(ir.serde.serialize_node(node), context, lexical)
        except (onnx.checker.ValidationError, TypeError, ValueError) as exc:
            problems.append(
                f"{_node_label(node)} fails the ONNX checker: {' '.join(str(exc).split())[:300]}"
            )
    return problems


def graph_problems(
    model: ir.Model, *, known_dead: frozenset[tuple[str, ...]] = frozenset()
) -> list[str]:
    """What is structurally wrong with ``model``'s graph (empty: nothing). ``known_dead``: the output
    names of dead nodes the input already had (a pass is not blamed for those)."""
    graph = model.graph
    problems = _dangling(graph) + _unsorted(graph)
    dead = [n for n in dead_nodes(graph) if tuple(v.name for v in n.outputs) not in known_dead]
    problems += [
        f"{_node_label(n)} is dead: none of its outputs reaches a graph output" for n in dead
    ]
    if not problems:
        problems = _schema_problems(model)
    return problems
